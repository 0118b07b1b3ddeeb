#!/usr/bin/env bash
# One node's share of a multi-node torchrun job (run it on every node):
#
#   NNODES=2 NODE_RANK=<i> MASTER_ADDR=<node 0 host> MASTER_PORT=6000 GPUS_PER_NODE=8 \
#     bash examples/qwen3_30b_a3b/train_adadpo.sh [extra trainer flags...]
#
# Flags live in flags.sh; extra arguments are appended and win. Node 0 first runs the
# layout planner and stops if the layout is invalid or does not fit. DRY_RUN=1 prints the
# torchrun command instead of running it; SKIP_PLAN=1 skips the planner.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=flags.sh
source "${HERE}/flags.sh"
RECIPE_FLAGS=("${QWEN3MOE_FLAGS[@]}")
RECIPE_PLAN_FLAGS=("${QWEN3MOE_PLAN_FLAGS[@]}")
RECIPE_NNODES=2
# shellcheck source=../launch_recipe.sh
source "${HERE}/../launch_recipe.sh"

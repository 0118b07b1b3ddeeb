#!/usr/bin/env bash
# Llama-3-70B AdaDPO, one node's share of a multi-node torchrun job (run it on every node).
#
#   NNODES=8 NODE_RANK=<0..7> MASTER_ADDR=<node 0 host> MASTER_PORT=6000 GPUS_PER_NODE=8 \
#     bash examples/llama3_70b/train_adadpo_70b.sh [extra trainer flags...]
#
# Flags live in flags.sh (shared with the Slurm wrapper); extra arguments are appended and
# win over them. Node 0 first runs the layout planner and stops if the layout is invalid or
# does not fit in GPU memory. DRY_RUN=1 prints the torchrun command instead of running it.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=flags.sh
source "${HERE}/flags.sh"
RECIPE_FLAGS=("${ADADPO_70B_FLAGS[@]}")
RECIPE_PLAN_FLAGS=("${PLAN_70B_FLAGS[@]}")
RECIPE_NNODES=8
# shellcheck source=../launch_recipe.sh
source "${HERE}/../launch_recipe.sh"

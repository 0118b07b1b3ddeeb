#!/usr/bin/env bash
# Llama-3-70B LoRA AdaDPO on one node of 8 GPUs (flags.sh): plan, then torchrun.
#   bash examples/llama3_70b_lora/train_lora_70b.sh [extra trainer flags, which win]
# DRY_RUN=1 prints the command instead of running it; SKIP_PLAN=1 skips the planner.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=flags.sh
source "${HERE}/flags.sh"
RECIPE_FLAGS=("${LORA_70B_FLAGS[@]}")
RECIPE_PLAN_FLAGS=("${PLAN_70B_FLAGS[@]}")
RECIPE_NNODES=1
# shellcheck source=../launch_recipe.sh
source "${HERE}/../launch_recipe.sh"

#!/usr/bin/env bash
# Llama-3-70B LoRA AdaDPO on one node of 8 GPUs (flags.sh): plan, then torchrun.
#   bash examples/llama3_70b_lora/train_lora_70b.sh [extra trainer flags, which win]
# DRY_RUN=1 prints the command instead of running it; SKIP_PLAN=1 skips the planner.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "${HERE}/../.." && pwd)"
source "${HERE}/flags.sh"
: "${GPUS_PER_NODE:=8}"
: "${MASTER_PORT:=6000}"
if [[ -z "${SKIP_PLAN:-}" ]]; then
  python "${REPO}/tools/plan_parallel.py" "${LORA_70B_FLAGS[@]}" "${PLAN_70B_FLAGS[@]}" "$@"
fi
CMD=(torchrun --nnodes 1 --nproc-per-node "${GPUS_PER_NODE}" --master-port "${MASTER_PORT}"
     -m adadpo_megatron.train "${LORA_70B_FLAGS[@]}" "$@")
if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' "${CMD[@]}"; echo
else
  exec "${CMD[@]}"
fi

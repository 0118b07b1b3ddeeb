#!/usr/bin/env bash
# One node's share of a multi-node torchrun job (run it on every node):
#
#   NNODES=8 NODE_RANK=<i> MASTER_ADDR=<node 0 host> MASTER_PORT=6000 GPUS_PER_NODE=8 \
#     bash examples/qwen2_5_72b/train_adadpo.sh [extra trainer flags...]
#
# Flags live in flags.sh; extra arguments are appended and win. Node 0 first runs the
# layout planner and stops if the layout is invalid or does not fit. DRY_RUN=1 prints the
# torchrun command instead of running it; SKIP_PLAN=1 skips the planner.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "${HERE}/../.." && pwd)"
# shellcheck source=flags.sh
source "${HERE}/flags.sh"

: "${NNODES:=8}"
: "${NODE_RANK:=0}"
: "${MASTER_ADDR:=localhost}"
: "${MASTER_PORT:=6000}"
: "${GPUS_PER_NODE:=8}"
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"
export CUDA_DEVICE_MAX_CONNECTIONS=1
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-900}"

if [[ "${NODE_RANK}" == "0" && "${SKIP_PLAN:-0}" != "1" ]]; then
  python "${REPO}/tools/plan_parallel.py" "${QWEN72_FLAGS[@]}" "${QWEN72_PLAN_FLAGS[@]}" \
    --num-gpus "$((NNODES * GPUS_PER_NODE))" "$@"
fi

cmd=(torchrun
  --nnodes "${NNODES}" --node-rank "${NODE_RANK}" --nproc-per-node "${GPUS_PER_NODE}"
  --master-addr "${MASTER_ADDR}" --master-port "${MASTER_PORT}"
  -m adadpo_megatron.train "${QWEN72_FLAGS[@]}" "$@")

if [[ "${DRY_RUN:-0}" == "1" ]]; then
  printf '%q ' "${cmd[@]}"
  printf '\n'
  exit 0
fi
exec "${cmd[@]}"

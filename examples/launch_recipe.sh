# One node's share of a recipe's multi-node torchrun job; sourced by each recipe's launcher
# (examples/*/train_*.sh) after it sourced its flags.sh and set:
#   RECIPE_FLAGS       the trainer flags (array)
#   RECIPE_PLAN_FLAGS  extra flags for tools/plan_parallel.py (array)
#   RECIPE_NNODES      the recipe's default node count
# and with the launcher's own arguments ("$@": extra trainer flags, appended, which win).
#
# Environment: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE (torchrun's node
# layout); DRY_RUN=1 prints the torchrun command instead of running it; SKIP_PLAN=1 skips
# the planner that node 0 runs first (it stops a layout that is invalid or does not fit).

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${NNODES:=${RECIPE_NNODES}}"
: "${NODE_RANK:=0}"
: "${MASTER_ADDR:=localhost}"
: "${MASTER_PORT:=6000}"
: "${GPUS_PER_NODE:=8}"
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"
# Megatron's TP/SP communication overlap needs kernels queued in order.
export CUDA_DEVICE_MAX_CONNECTIONS=1
# torchrun forwards SIGTERM to its workers, then kills them after this many seconds: leave
# time to finish the step and write the checkpoint (--exit-signal-handler).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-900}"

if [[ "${NODE_RANK}" == "0" && "${SKIP_PLAN:-0}" != "1" ]]; then
  python "${REPO}/tools/plan_parallel.py" "${RECIPE_FLAGS[@]}" "${RECIPE_PLAN_FLAGS[@]}" \
    --num-gpus "$((NNODES * GPUS_PER_NODE))" "$@"
fi

cmd=(torchrun
  --nnodes "${NNODES}" --node-rank "${NODE_RANK}" --nproc-per-node "${GPUS_PER_NODE}"
  --master-addr "${MASTER_ADDR}" --master-port "${MASTER_PORT}"
  -m adadpo_megatron.train "${RECIPE_FLAGS[@]}" "$@")

if [[ "${DRY_RUN:-0}" == "1" ]]; then
  printf '%q ' "${cmd[@]}"
  printf '\n'
  exit 0
fi
exec "${cmd[@]}"

#!/usr/bin/env bash
# The Llama-3-70B AdaDPO journey of this folder's README, shrunk to a 4-layer Llama on 8 CPU
# processes with the recipe's own layout: TP=2 + sequence parallelism, PP=2 with 2 virtual
# chunks per stage, DP=2, distributed optimizer, selective recompute, precomputed reference.
#
#   bash examples/llama3_70b/rehearse.sh [WORK_DIR]      (default runs/rehearsal; emptied)
#
# Stages: 1 random-init HF Llama (transformers) -> 2 convert_hf_to_megatron.py -> 3 adadpo-pack
# (separate and prefix-shared layouts) -> 4 precompute_ref_logprobs.py on the recipe layout
# (both layouts) -> 5 train_adadpo_70b.sh, uninterrupted -> 6 the same run SIGTERMed mid-run
# -> 7 relaunched as the sbatch requeue does (flags.sh finds the checkpoint) and compared with
# 5 -> 8 export to Hugging Face and compare transformers' logits with megatron-core's.
# The flag list is flags.sh's own; ADADPO_70B_SET / ADADPO_70B_DROP (printed as they apply)
# change only sizes, paths and what a CPU cannot do (bf16, FP8). Exits non-zero on any
# failed check. Needs the packages of tools/setup_env.sh.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "${HERE}/../.." && pwd)"
W="$(mkdir -p "${1:-${REPO}/runs/rehearsal}" && cd "${1:-${REPO}/runs/rehearsal}" && pwd)"
rm -rf "${W:?}"/*
cd "${REPO}"
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"
export TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=1
START=${SECONDS}
stage() { echo; echo "== [$((SECONDS - START)) s] $*"; }

# What a CPU cannot do, then the sizes. Everything else is the recipe's.
export ADADPO_70B_DROP="--bf16 --fp8-format --fp8-recipe --fp8-amax-history-len --fp8-amax-compute-algo"
export ADADPO_70B_SET="--num-layers=4 --hidden-size=64 --ffn-hidden-size=176
  --num-attention-heads=4 --num-query-groups=2 --seq-length=256 --max-position-embeddings=256
  --tensor-model-parallel-size=2 --pipeline-model-parallel-size=2
  --num-layers-per-virtual-pipeline-stage=1 --global-batch-size=8 --save-interval=4"
export ADADPO_70B_TRAIN_ITERS=${REHEARSAL_TRAIN_ITERS:-8}
export NNODES=1 NODE_RANK=0 GPUS_PER_NODE=8 MASTER_ADDR=127.0.0.1
TOKENIZER="${REPO}/examples/data/tokenizer.model"   # 1024 pieces
PAIRS="${W}/pairs.jsonl"
head -n "${REHEARSAL_PAIRS:-240}" "${REPO}/examples/data/train.jsonl" > "${PAIRS}"
free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
flags_for() {  # the recipe's flag list for data $1 and save dir $2, as one shell-quoted string
  ADADPO_70B_DATA="$1" ADADPO_70B_SAVE="$2" ADADPO_70B_INIT="${W}/init" bash -c \
    'source "$0/flags.sh" 2>/dev/null && printf "%q " "${ADADPO_70B_FLAGS[@]}"' "${HERE}"
}

stage "overrides of flags.sh (everything else is the recipe's)"
ADADPO_70B_DATA=/unused bash -c 'source "$0/flags.sh" >/dev/null' "${HERE}"

stage "1. random-init Hugging Face Llama (transformers)"
python "${HERE}/rehearsal.py" make-hf --output "${W}/hf" --vocab-size 1024 \
  --flags "$(flags_for "${W}/data" "${W}/run")"

stage "2. convert_hf_to_megatron.py (torch_dist, fp32)"
python tools/convert_hf_to_megatron.py --hf "${W}/hf" --output "${W}/init" --format torch_dist \
  --dtype fp32 | tail -n 3

stage "3. adadpo-pack, separate and prefix-shared layouts (aligned for TP=2 + SP)"
for layout in separate shared; do
  extra=(); [[ ${layout} == shared ]] && extra=(--prefix-sharing)
  adadpo-pack "${PAIRS}" --output "${W}/data_${layout}" --tokenizer "${TOKENIZER}" \
    --max-seq-len 128 --pack-size 256 --align 16 "${extra[@]}" | tail -n 2
done

for layout in separate shared; do
  stage "4. precompute_ref_logprobs.py on the recipe layout (${layout})"
  eval "flags=($(flags_for "${W}/data_${layout}" "${W}/unused"))"
  torchrun --nproc-per-node 8 --master-addr 127.0.0.1 --master-port "$(free_port)" \
    tools/precompute_ref_logprobs.py "${flags[@]}" --ref-load "${W}/init" 2>&1 | tail -n 2
done

launch() {  # train_adadpo_70b.sh on data $1, save dir $2 (the user's own launcher)
  ADADPO_70B_DATA="$1" ADADPO_70B_SAVE="$2" ADADPO_70B_INIT="${W}/init" \
    MASTER_PORT="$(free_port)" bash "${HERE}/train_adadpo_70b.sh"
}

stage "5. train_adadpo_70b.sh, uninterrupted (${ADADPO_70B_TRAIN_ITERS} steps)"
launch "${W}/data_separate" "${W}/uninterrupted" > "${W}/uninterrupted.log" 2>&1 \
  || { tail -n 40 "${W}/uninterrupted.log"; exit 1; }
grep -E "^ *step|iteration" "${W}/uninterrupted.log" | tail -n 2 || true

stage "6. the same run, SIGTERM (Slurm's warning) once step 3 is logged"
# A plain command (not the function) so that $! is the launcher, which execs torchrun.
ADADPO_70B_DATA="${W}/data_separate" ADADPO_70B_SAVE="${W}/requeued" ADADPO_70B_INIT="${W}/init" \
  MASTER_PORT="$(free_port)" bash "${HERE}/train_adadpo_70b.sh" > "${W}/requeued.log" 2>&1 &
pid=$!
metrics="${W}/requeued/logs/metrics.jsonl"
until [[ -f "${metrics}" ]] && (( $(grep -c '"loss"' "${metrics}") >= 3 )); do
  kill -0 "${pid}" 2>/dev/null || { tail -n 40 "${W}/requeued.log"; echo "ended before step 3"; exit 1; }
  sleep 0.2
done
kill -TERM "${pid}"   # the launcher execs torchrun, which forwards SIGTERM to every rank
# torchrun itself exits non-zero after a SIGTERM (its agent re-raises the signal); the sbatch
# wrapper ignores that status too. What counts: every rank finished the step and saved.
wait "${pid}" || true
grep -q "exiting after step [0-9]*: signal SIGTERM" "${W}/requeued.log" \
  || { tail -n 40 "${W}/requeued.log"; echo "the trainer did not save and exit on SIGTERM"; exit 1; }
echo "stopped and saved at step $(cat "${W}/requeued/latest_checkpointed_iteration.txt")"

stage "7. relaunch as the sbatch requeue does (flags.sh picks --load from --save)"
launch "${W}/data_separate" "${W}/requeued" >> "${W}/requeued.log" 2>&1 \
  || { tail -n 40 "${W}/requeued.log"; exit 1; }
python "${HERE}/rehearsal.py" compare --reference "${W}/uninterrupted" --resumed "${W}/requeued"

stage "5b. prefix-shared data on the same layout (2 steps)"
ADADPO_70B_TRAIN_ITERS=2 launch "${W}/data_shared" "${W}/shared" > "${W}/shared.log" 2>&1 \
  || { tail -n 40 "${W}/shared.log"; exit 1; }
grep -c '"loss"' "${W}/shared/logs/metrics.jsonl"

stage "8. export to Hugging Face (fp32, as trained); transformers' logits vs megatron-core's"
python tools/convert_hf_to_megatron.py --to-hf --megatron "${W}/uninterrupted" \
  --format torch_dist --hf-config "${W}/hf/config.json" --output "${W}/hf_out" --dtype fp32 \
  | tail -n 1
tokens=$(python -c 'import random; r=random.Random(0); print(",".join(str(r.randrange(1024)) for _ in range(64)))')
python examples/smollm2/roundtrip.py --megatron "${W}/uninterrupted" --hf "${W}/hf_out" \
  --tokens "${tokens}" | tee "${W}/roundtrip.json"
python - "${W}/roundtrip.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
# fp64 measures the conversion alone; fp32 differs by op order only (see roundtrip.py).
ok = r["max_abs_diff_fp64"] <= 1e-6 and r["max_abs_diff"] <= 1e-4 * max(1.0, r["max_abs_logit"])
sys.exit(0 if ok else f"exported logits differ: {r}")
PY

stage "rehearsal passed in $((SECONDS - START)) s (work dir ${W})"

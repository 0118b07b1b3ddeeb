# Llama-3-70B AdaDPO on H100 80GB: the one list of trainer flags that both
# train_adadpo_70b.sh (torchrun) and slurm_adadpo_70b.sbatch use. Source it; it defines
#   ADADPO_70B_FLAGS  the trainer's flags (adadpo_megatron.train / adadpo-train)
#   PLAN_70B_FLAGS    extra flags for tools/plan_parallel.py (the tokenizer's vocabulary)
# Paths and run length come from the environment (defaults below).
#
# Overrides without a second copy of this list (examples/llama3_70b/rehearse.sh uses them):
#   ADADPO_70B_SET="--num-layers=4 --hidden-size=64"   replace the value of flags in the list
#   ADADPO_70B_DROP="--bf16 --fp8-format"             remove flags (and their values)
# Each override is printed on stderr; naming a flag the list does not hold is an error.
#
# Layout (64 GPUs = 8 nodes x 8 H100): TP=8 inside a node (NVLink) with sequence
# parallelism, PP=4 with 4 virtual chunks of 5 layers per rank (interleaved 1F1B),
# DP=2 with the distributed optimizer. FP8 hybrid (e4m3 forward, e5m2 gradients) with
# delayed scaling. Packs of 8192 tokens = 2 x 4096: the chosen and rejected sequences of
# a pair are each truncated to 4096 (adadpo-pack --max-seq-len 4096 --pack-size 8192).
# `python tools/plan_parallel.py "${ADADPO_70B_FLAGS[@]}" "${PLAN_70B_FLAGS[@]}"` puts
# the busiest GPU (pipeline rank 0) at about 50 GiB of 80.

: "${ADADPO_70B_DATA:=/data/adadpo/ultrafeedback_llama3_8192}"   # adadpo-pack output dir
: "${ADADPO_70B_REF:=${ADADPO_70B_DATA}/ref_logprobs.npz}"        # precompute_ref_logprobs.py
: "${ADADPO_70B_INIT:=/checkpoints/llama3-70b-instruct-mcore}"   # convert_hf_to_megatron.py
: "${ADADPO_70B_SAVE:=/checkpoints/adadpo-llama3-70b}"
: "${ADADPO_70B_TRAIN_ITERS:=480}"   # optimizer steps (e.g. ~61k pairs / 128 per step)

# A requeued job resumes from its own last checkpoint; a new one starts from the SFT model.
if [[ -f "${ADADPO_70B_SAVE}/latest_checkpointed_iteration.txt" ]]; then
  ADADPO_70B_LOAD=(--load "${ADADPO_70B_SAVE}")
else
  ADADPO_70B_LOAD=(--load "${ADADPO_70B_INIT}" --finetune)
fi

ADADPO_70B_FLAGS=(
  # model: Llama-3-70B (GQA 64/8, SwiGLU, RMSNorm, RoPE 500k, untied embeddings, no biases)
  --num-layers 80 --hidden-size 8192 --ffn-hidden-size 28672
  --num-attention-heads 64 --group-query-attention --num-query-groups 8
  --seq-length 8192 --max-position-embeddings 8192
  --normalization RMSNorm --norm-epsilon 1e-5 --swiglu
  --position-embedding-type rope --rotary-base 500000
  --untie-embeddings-and-output-weights --disable-bias-linear
  --make-vocab-size-divisible-by 128
  # parallel layout
  --tensor-model-parallel-size 8 --sequence-parallel
  --pipeline-model-parallel-size 4 --num-layers-per-virtual-pipeline-stage 5
  --use-distributed-optimizer
  # precision and memory: bf16 weights, FP8 GEMMs, selective activation recompute
  --bf16 --fp8-format hybrid --fp8-recipe delayed
  --fp8-amax-history-len 1024 --fp8-amax-compute-algo max
  --recompute-granularity selective
  # batch (packs of 2 x 4096 tokens; one micro-batch = one pack) and schedule
  --micro-batch-size 1 --global-batch-size 128
  --train-iters "${ADADPO_70B_TRAIN_ITERS}"
  --lr 5e-7 --min-lr 0 --lr-decay-style cosine --lr-warmup-fraction 0.1
  --weight-decay 0.0 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
  --seed 1234
  # loss: AdaDPO against precomputed reference log-probs (no reference model on the GPUs)
  --preference-loss adadpo --dpo-beta 0.1
  --ref-logprobs "${ADADPO_70B_REF}"
  # data, checkpoints, logs
  --data-path "${ADADPO_70B_DATA}"
  "${ADADPO_70B_LOAD[@]}"
  --save "${ADADPO_70B_SAVE}" --save-interval 100
  # SIGTERM (Slurm's warning before the time limit): finish the step, save, exit 0
  --exit-signal-handler
  --log-interval 1 --log-dir "${ADADPO_70B_SAVE}/logs"
)

PLAN_70B_FLAGS=(--vocab-size 128256)

# --- overrides (ADADPO_70B_SET / ADADPO_70B_DROP, see the top of this file) ---------------
_adadpo_70b_find() {  # index of flag $1 in ADADPO_70B_FLAGS, or -1
  local i
  for i in "${!ADADPO_70B_FLAGS[@]}"; do
    [[ "${ADADPO_70B_FLAGS[$i]}" == "$1" ]] && { echo "$i"; return; }
  done
  echo -1
}
_adadpo_70b_nvalues() {  # how many values follow the flag at index $1
  local n=0 j=$(($1 + 1))
  while ((j < ${#ADADPO_70B_FLAGS[@]})) && [[ "${ADADPO_70B_FLAGS[$j]}" != --* ]]; do
    n=$((n + 1)); j=$((j + 1))
  done
  echo "$n"
}
_adadpo_70b_overrides() {
  local item flag value i n old
  for item in ${ADADPO_70B_DROP:-}; do
    i=$(_adadpo_70b_find "${item}")
    if ((i < 0)); then
      echo "flags.sh: ADADPO_70B_DROP names ${item}, which the flag list does not hold" >&2
      return 1
    fi
    n=$(_adadpo_70b_nvalues "$i")
    echo "flags.sh: drop ${ADADPO_70B_FLAGS[*]:$i:$((n + 1))}" >&2
    ADADPO_70B_FLAGS=("${ADADPO_70B_FLAGS[@]:0:$i}" "${ADADPO_70B_FLAGS[@]:$((i + n + 1))}")
  done
  for item in ${ADADPO_70B_SET:-}; do
    if [[ "${item}" != --*=* ]]; then
      echo "flags.sh: ADADPO_70B_SET item '${item}' is not --flag=value" >&2
      return 1
    fi
    flag=${item%%=*}
    value=${item#*=}
    i=$(_adadpo_70b_find "${flag}")
    if ((i < 0)); then
      echo "flags.sh: ADADPO_70B_SET names ${flag}, which the flag list does not hold" >&2
      return 1
    fi
    n=$(_adadpo_70b_nvalues "$i")
    if ((n != 1)); then
      echo "flags.sh: ADADPO_70B_SET: ${flag} takes ${n} values here, not one" >&2
      return 1
    fi
    old=${ADADPO_70B_FLAGS[$((i + 1))]}
    [[ "${old}" != "${value}" ]] && echo "flags.sh: set ${flag} ${old} -> ${value}" >&2
    ADADPO_70B_FLAGS[$((i + 1))]=${value}
  done
}
_adadpo_70b_overrides || return 1 2>/dev/null || exit 1

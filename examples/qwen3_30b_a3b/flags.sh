# Qwen3-30B-A3B AdaDPO on H100 80GB (mixture of experts, expert parallelism): the trainer
# flags train_adadpo.sh uses. Source it; it defines
#   QWEN3MOE_FLAGS       the trainer's flags (adadpo_megatron.train / adadpo-train)
#   QWEN3MOE_PLAN_FLAGS  extra flags for tools/plan_parallel.py (the tokenizer's vocabulary)
#
# The model flags are what tools/convert_hf_to_megatron.py prints for the model's
# config.json: 48 layers, 128 experts of width 768, top-8 routing renormalised over the 8
# (norm_topk_prob: true), per-head q/k RMSNorm, head size 128 (--kv-channels), RoPE 1e6,
# router load-balancing loss 1e-3 (the model's router_aux_loss_coef).
# Layout (16 GPUs = 2 nodes x 8 H100): TP=1, EP=8 (16 experts per GPU, the alltoall
# dispatcher, grouped GEMM), DP=16 (expert DP=2), distributed optimizer, bf16, full
# recompute of every layer (top-8 routing keeps 8 copies of each token's MLP
# activations), packs of 8192 = 2 x 4096 tokens.

: "${QWEN3MOE_DATA:=/data/adadpo/ultrafeedback_qwen3_8192}"
: "${QWEN3MOE_REF:=${QWEN3MOE_DATA}/ref_logprobs.npz}"
: "${QWEN3MOE_INIT:=/checkpoints/qwen3-30b-a3b-mcore}"
: "${QWEN3MOE_SAVE:=/checkpoints/adadpo-qwen3-30b-a3b}"
: "${QWEN3MOE_TRAIN_ITERS:=480}"

if [[ -f "${QWEN3MOE_SAVE}/latest_checkpointed_iteration.txt" ]]; then
  QWEN3MOE_LOAD=(--load "${QWEN3MOE_SAVE}")
else
  QWEN3MOE_LOAD=(--load "${QWEN3MOE_INIT}" --finetune)
fi

QWEN3MOE_FLAGS=(
  # model: Qwen3-30B-A3B
  --num-layers 48 --hidden-size 2048 --ffn-hidden-size 6144
  --num-attention-heads 32 --group-query-attention --num-query-groups 4 --kv-channels 128
  --seq-length 8192 --max-position-embeddings 8192
  --normalization RMSNorm --norm-epsilon 1e-06 --swiglu
  --position-embedding-type rope --rotary-base 1000000
  --disable-bias-linear --qk-layernorm --untie-embeddings-and-output-weights
  --make-vocab-size-divisible-by 128
  # mixture of experts
  --num-experts 128 --moe-router-topk 8 --moe-ffn-hidden-size 768
  --moe-aux-loss-coeff 0.001 --moe-router-load-balancing-type aux_loss
  --moe-token-dispatcher-type alltoall --moe-grouped-gemm
  --expert-model-parallel-size 8
  # parallel layout, precision and memory
  --use-distributed-optimizer --bf16
  --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
  # batch and schedule
  --micro-batch-size 1 --global-batch-size 128
  --train-iters "${QWEN3MOE_TRAIN_ITERS}"
  --lr 5e-7 --min-lr 0 --lr-decay-style cosine --lr-warmup-fraction 0.1
  --weight-decay 0.0 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
  --seed 1234
  # loss: AdaDPO against precomputed reference log-probs
  --preference-loss adadpo --dpo-beta 0.1
  --ref-logprobs "${QWEN3MOE_REF}"
  # data, checkpoints, logs
  --data-path "${QWEN3MOE_DATA}"
  "${QWEN3MOE_LOAD[@]}"
  --save "${QWEN3MOE_SAVE}" --save-interval 100
  --exit-signal-handler
  --log-interval 1 --log-dir "${QWEN3MOE_SAVE}/logs"
)

QWEN3MOE_PLAN_FLAGS=(--vocab-size 151936)

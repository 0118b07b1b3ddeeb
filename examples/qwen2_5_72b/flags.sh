# Qwen2.5-72B-Instruct AdaDPO on H100 80GB: the trainer flags train_adadpo.sh uses. Source it;
# it defines
#   QWEN72_FLAGS       the trainer's flags (adadpo_megatron.train / adadpo-train)
#   QWEN72_PLAN_FLAGS  extra flags for tools/plan_parallel.py (the tokenizer's vocabulary)
# Paths and run length come from the environment (defaults below).
#
# The model flags are what tools/convert_hf_to_megatron.py prints for the model's
# config.json (Llama-shaped plus q/k/v biases: --add-qkv-bias; vocabulary 152064, RoPE
# base 1e6). Layout as for Llama-3-70B (64 GPUs = 8 nodes x 8 H100): TP=8 + sequence
# parallelism inside a node, PP=4 with 4 virtual chunks of 5 layers, DP=2, distributed
# optimizer, FP8 hybrid GEMMs, packs of 8192 = 2 x 4096 tokens.

: "${QWEN72_DATA:=/data/adadpo/ultrafeedback_qwen25_8192}"       # adadpo-pack output dir
: "${QWEN72_REF:=${QWEN72_DATA}/ref_logprobs.npz}"                 # precompute_ref_logprobs.py
: "${QWEN72_INIT:=/checkpoints/qwen2.5-72b-instruct-mcore}"        # convert_hf_to_megatron.py
: "${QWEN72_SAVE:=/checkpoints/adadpo-qwen2.5-72b}"
: "${QWEN72_TRAIN_ITERS:=480}"

if [[ -f "${QWEN72_SAVE}/latest_checkpointed_iteration.txt" ]]; then
  QWEN72_LOAD=(--load "${QWEN72_SAVE}")
else
  QWEN72_LOAD=(--load "${QWEN72_INIT}" --finetune)
fi

QWEN72_FLAGS=(
  # model: Qwen2.5-72B (GQA 64/8, SwiGLU, RMSNorm 1e-6, RoPE 1e6, q/k/v bias, untied)
  --num-layers 80 --hidden-size 8192 --ffn-hidden-size 29568
  --num-attention-heads 64 --group-query-attention --num-query-groups 8
  --seq-length 8192 --max-position-embeddings 8192
  --normalization RMSNorm --norm-epsilon 1e-06 --swiglu
  --position-embedding-type rope --rotary-base 1000000
  --disable-bias-linear --add-qkv-bias --untie-embeddings-and-output-weights
  --make-vocab-size-divisible-by 128
  # parallel layout
  --tensor-model-parallel-size 8 --sequence-parallel
  --pipeline-model-parallel-size 4 --num-layers-per-virtual-pipeline-stage 5
  --use-distributed-optimizer
  # precision and memory
  --bf16 --fp8-format hybrid --fp8-recipe delayed
  --fp8-amax-history-len 1024 --fp8-amax-compute-algo max
  --recompute-granularity selective
  # batch and schedule
  --micro-batch-size 1 --global-batch-size 128
  --train-iters "${QWEN72_TRAIN_ITERS}"
  --lr 5e-7 --min-lr 0 --lr-decay-style cosine --lr-warmup-fraction 0.1
  --weight-decay 0.0 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
  --seed 1234
  # loss: AdaDPO against precomputed reference log-probs
  --preference-loss adadpo --dpo-beta 0.1
  --ref-logprobs "${QWEN72_REF}"
  # data, checkpoints, logs
  --data-path "${QWEN72_DATA}"
  "${QWEN72_LOAD[@]}"
  --save "${QWEN72_SAVE}" --save-interval 100
  --exit-signal-handler
  --log-interval 1 --log-dir "${QWEN72_SAVE}/logs"
)

QWEN72_PLAN_FLAGS=(--vocab-size 152064)

# Llama-3-70B LoRA AdaDPO on ONE node of 8 H100 80GB, reference = the base model.
# Source it; it defines
#   LORA_70B_FLAGS  the trainer's flags (adadpo_megatron.train / adadpo-train)
#   PLAN_70B_FLAGS  extra flags for tools/plan_parallel.py (the tokenizer's vocabulary)
#
# Layout: TP=8 with sequence parallelism inside the node, PP=1, DP=1. The base weights
# (bf16, 141 GB / 8 = 17.6 GB per GPU) are frozen: no gradient buffers, no Adam state.
# Rank-16 adapters on all four linears of every layer (176 M parameters, 0.25% of the
# model) carry the gradients and the optimizer state (0.9 GiB per GPU). With no
# --ref-logprobs/--ref-load the reference log-probs come from the same model with the
# adapters switched off (a forward-only pass before each step): no second copy of the
# model, no precompute pass. Packs of 8192 tokens (2 x 4096), selective recompute.
# `python tools/plan_parallel.py "${LORA_70B_FLAGS[@]}" "${PLAN_70B_FLAGS[@]}"`: 39 GiB per
# GPU (16.5 weights, 21 activations) of 80 (tests/unit/test_llama3_70b_lora_example.py).

: "${LORA_70B_DATA:=/data/adadpo/ultrafeedback_llama3_8192}"    # adadpo-pack output dir
: "${LORA_70B_BASE:=/checkpoints/llama3-70b-instruct-mcore}"   # convert_hf_to_megatron.py
: "${LORA_70B_SAVE:=/checkpoints/adadpo-llama3-70b-lora}"
: "${LORA_70B_TRAIN_ITERS:=480}"

# A requeued job resumes from its own adapter checkpoint (which records its base and
# checks the base's fingerprint); a new one puts fresh adapters on the converted base.
if [[ -f "${LORA_70B_SAVE}/latest_checkpointed_iteration.txt" ]]; then
  LORA_70B_LOAD=(--load "${LORA_70B_SAVE}")
else
  LORA_70B_LOAD=(--load "${LORA_70B_BASE}" --finetune)
fi

LORA_70B_FLAGS=(
  # model: Llama-3-70B (GQA 64/8, SwiGLU, RMSNorm, RoPE 500k, untied embeddings, no biases)
  --num-layers 80 --hidden-size 8192 --ffn-hidden-size 28672
  --num-attention-heads 64 --group-query-attention --num-query-groups 8
  --seq-length 8192 --max-position-embeddings 8192
  --normalization RMSNorm --norm-epsilon 1e-5 --swiglu
  --position-embedding-type rope --rotary-base 500000
  --untie-embeddings-and-output-weights --disable-bias-linear
  --make-vocab-size-divisible-by 128
  # one node: TP=8 (NVLink) with sequence parallelism
  --tensor-model-parallel-size 8 --sequence-parallel
  --bf16 --recompute-granularity selective
  # LoRA (NeMo / Megatron-Bridge flag names)
  --lora-rank 16 --lora-alpha 32 --lora-dropout 0.05
  --lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2
  # batch and schedule: adapters take a larger learning rate than full fine-tuning
  --micro-batch-size 1 --global-batch-size 64
  --train-iters "${LORA_70B_TRAIN_ITERS}"
  --lr 5e-5 --min-lr 0 --lr-decay-style cosine --lr-warmup-fraction 0.1
  --weight-decay 0.0 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
  --seed 1234
  # loss: AdaDPO; reference = base (adapters off), no reference flag
  --preference-loss adadpo --dpo-beta 0.1
  # data, checkpoints (adapters only: a few GB with their Adam state), logs
  --data-path "${LORA_70B_DATA}"
  "${LORA_70B_LOAD[@]}"
  --save "${LORA_70B_SAVE}" --save-interval 50
  --exit-signal-handler
  --log-interval 1 --log-dir "${LORA_70B_SAVE}/logs"
)

PLAN_70B_FLAGS=(--vocab-size 128256 --num-gpus 8)

"""Parallel-layout planner: parameter counts, per-GPU memory and FLOPs of a GPT run.

Pure arithmetic (no torch, no process groups), so a layout can be checked on a laptop
before a 70B job is queued. ``tools/plan_parallel.py`` is its command line.

* Parameters are counted exactly as megatron-core's ``GPTModel`` allocates them
  (local and Transformer Engine specs alike): the vocabulary padded to a multiple of
  ``make_vocab_size_divisible_by * TP`` (Megatron-LM), column-parallel weights and biases
  split over TP, row-parallel biases and norms replicated, the embedding on the first
  pipeline stage, the final norm and output layer on the last (a tied output weight is
  duplicated there when PP > 1).
* Memory per GPU, in bytes: bf16 weights (+ TE's cached FP8 weight and transpose under
  FP8), fp32 main gradients (megatron-core DDP accumulates in fp32), Adam state (fp32
  master, m, v; split over DP x CP by the distributed optimizer), activations, and the
  last stage's logits.
* Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in
  Large Transformer Models"), generalised to GQA and SwiGLU, with flash attention (TE's
  fused attention keeps no s^2 score matrix): per layer and token, bytes kept for
  backward are ``2h`` (input norm) + ``2h`` (QKV input) + ``2(q+2kv)`` (Q, K, V) + ``2q``
  (projection input) + ``2h`` (pre-MLP norm) + ``2h`` (fc1 input) + ``2F'`` (fc1 output,
  F' = 2F under SwiGLU) + ``2F`` (fc2 input), plus ``h`` per dropout mask when dropout is on.
  Sequence parallelism divides every term by TP (without it, the norm and GEMM inputs and
  masks are replicated); context parallelism divides the tokens by CP. Under FP8, TE keeps
  the four GEMM inputs in FP8 (1 byte). Pipeline stage ``r`` holds the micro-batches of
  megatron-core's warm-up phase plus one (1F1B; interleaved counts in model chunks).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from adadpo_megatron.planner import moe

GIB = 1024**3


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelShape:
    """GPT shape, in Megatron-LM flag terms."""

    num_layers: int
    """--num-layers."""
    hidden_size: int
    """--hidden-size (h)."""
    ffn_hidden_size: int
    """--ffn-hidden-size (F)."""
    num_attention_heads: int
    """--num-attention-heads (a)."""
    num_query_groups: int
    """--num-query-groups: KV heads (g); == a without GQA."""
    vocab_size: int
    """Tokenizer vocabulary, before Megatron's padding."""
    swiglu: bool = True
    """--swiglu: fc1 holds [gate; up], 2F outputs."""
    normalization: str = "RMSNorm"
    """--normalization: RMSNorm (weight) or LayerNorm (weight and bias)."""
    add_bias_linear: bool = False
    """Biases in linear layers (not --disable-bias-linear)."""
    untie_embeddings: bool = True
    """--untie-embeddings-and-output-weights."""
    position_embedding_type: str = "rope"
    """--position-embedding-type: rope (no parameters) or learned_absolute."""
    max_position_embeddings: int = 0
    """--max-position-embeddings: rows of the learned position table."""
    make_vocab_size_divisible_by: int = 128
    """--make-vocab-size-divisible-by (times TP)."""
    kv_channels: int | None = None
    """--kv-channels: head size (None: h / a)."""
    add_qkv_bias: bool = False
    """--add-qkv-bias (Qwen2)."""
    qk_layernorm: bool = False
    """--qk-layernorm (Qwen3): a [head_dim] norm each for q and k."""
    num_experts: int | None = None
    """--num-experts: MoE MLP in every layer (planner/moe.py); None: dense."""
    moe_router_topk: int = 2
    """--moe-router-topk (k)."""
    moe_ffn_hidden_size: int | None = None
    """--moe-ffn-hidden-size (F_e)."""
    moe_shared_expert_intermediate_size: int | None = None
    """--moe-shared-expert-intermediate-size (F_s)."""

    @property
    def head_dim(self) -> int:
        """kv_channels (default h / a)."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def padded_vocab(self, tp: int) -> int:
        """Vocabulary rounded up to a multiple of make_vocab_size_divisible_by * TP."""
        multiple = self.make_vocab_size_divisible_by * tp
        return math.ceil(self.vocab_size / multiple) * multiple


PRESETS: dict[str, ModelShape] = {
    # Meta's Llama 3 model cards / config.json: GQA with 8 KV heads, SwiGLU, RMSNorm, RoPE.
    "llama3-8b": ModelShape(
        num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
        num_query_groups=8, vocab_size=128256,
    ),
    "llama3-70b": ModelShape(
        num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64,
        num_query_groups=8, vocab_size=128256,
    ),
    # Qwen's config.json files: Qwen2.5 has q/k/v biases; Qwen3-MoE 128 experts, top-8.
    "qwen2.5-72b": ModelShape(
        num_layers=80, hidden_size=8192, ffn_hidden_size=29568, num_attention_heads=64,
        num_query_groups=8, vocab_size=152064, add_qkv_bias=True,
    ),
    "qwen3-30b-a3b": ModelShape(
        num_layers=48, hidden_size=2048, ffn_hidden_size=6144, num_attention_heads=32,
        num_query_groups=4, vocab_size=151936, kv_channels=128, qk_layernorm=True,
        num_experts=128, moe_router_topk=8, moe_ffn_hidden_size=768,
    ),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Layout:
    """Parallel layout, batch and precision of one run (the trainer's flags)."""

    tp: int = 1
    """--tensor-model-parallel-size."""
    pp: int = 1
    """--pipeline-model-parallel-size."""
    vpp: int | None = None
    """Model chunks per pipeline rank (from --num-layers-per-virtual-pipeline-stage)."""
    cp: int = 1
    """--context-parallel-size."""
    world_size: int = 1
    """GPUs in the job; DP = world / (TP * PP * CP)."""
    sequence_parallel: bool = False
    """--sequence-parallel."""
    distributed_optimizer: bool = False
    """--use-distributed-optimizer: Adam state and master weights sharded over DP x CP."""
    recompute_granularity: str | None = None
    """--recompute-granularity: full, selective or None."""
    recompute_method: str | None = None
    """--recompute-method: uniform or block (full only)."""
    recompute_num_layers: int | None = None
    """--recompute-num-layers: layers per recompute group (uniform) or recomputed (block)."""
    bf16: bool = True
    """--bf16 (else fp32 weights, no separate master copy)."""
    fp8: bool = False
    """--fp8-format given: GEMMs in FP8 through TE."""
    fp8_param_gather: bool = False
    """--fp8-param-gather: GEMM weights stored in FP8."""
    pack_multiple: int = 1
    """Padding multiple of a pack for the FP8 recipe (fp8.pack_multiple)."""
    seq_length: int = 4096
    """--seq-length: tokens per pack."""
    micro_batch_size: int = 1
    """--micro-batch-size: packs per micro-batch."""
    global_batch_size: int = 1
    """--global-batch-size: packs per optimizer step."""
    dropout: bool = False
    """hidden or attention dropout > 0 (masks are then kept for backward)."""
    online_reference: bool = False
    """A frozen reference model is held on the GPUs (no --ref-logprobs)."""
    logprob_chunk_tokens: int = 4096
    """Tokens per fp32 log-softmax block (logprobs.vocab_parallel_logprobs, ``chunked``)."""
    logprob_impl: str = "fused"
    """--logprob-impl: ``fused`` (no logits tensor) or ``chunked`` (bf16 logits + fp32 blocks)."""
    ep: int = 1
    """--expert-model-parallel-size (MoE)."""
    etp: int | None = None
    """--expert-tensor-parallel-size (None: TP)."""
    lora_rank: int | None = None
    """--lora-rank: LoRA adapters on a frozen base (planner/lora.py); None = full training."""
    lora_targets: tuple[str, ...] = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
    """--lora-target-modules."""
    base_reference: bool = False
    """LoRA with no --ref-* flag: the reference is a forward pass of the base itself."""

    @property
    def dp(self) -> int:
        """Data-parallel size."""
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per step and DP rank."""
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    @property
    def chunks(self) -> int:
        """Model chunks per pipeline rank (1 without virtual pipelining)."""
        return self.vpp or 1


def check_layout(shape: ModelShape, lay: Layout) -> list[str]:
    """Every divisibility rule megatron-core (and our packing) enforces; messages name flags."""
    s, errors = shape, []

    def need(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    h, a, g, tp = s.hidden_size, s.num_attention_heads, s.num_query_groups, lay.tp
    need(h % a == 0, f"--hidden-size {h} is not divisible by --num-attention-heads {a}")
    need(a % g == 0, f"--num-attention-heads {a} is not divisible by --num-query-groups {g}")
    need(a % tp == 0, f"--num-attention-heads {a} is not divisible by TP {tp}")
    need(g % tp == 0, f"--num-query-groups {g} is not divisible by TP {tp}")
    need(s.ffn_hidden_size % tp == 0,
         f"--ffn-hidden-size {s.ffn_hidden_size} is not divisible by TP {tp}")
    mp = tp * lay.pp * lay.cp
    need(lay.world_size % mp == 0,
         f"{lay.world_size} GPUs are not divisible by TP*PP*CP = {mp}")
    need(s.num_layers % lay.pp == 0,
         f"--num-layers {s.num_layers} is not divisible by --pipeline-model-parallel-size {lay.pp}")
    if lay.vpp is not None:
        need(lay.pp >= 2, "virtual pipelining needs --pipeline-model-parallel-size >= 2")
        need(s.num_layers % (lay.pp * lay.vpp) == 0,
             f"--num-layers {s.num_layers} is not divisible by PP {lay.pp} x {lay.vpp} chunks")
    need(not lay.sequence_parallel or tp > 1, "--sequence-parallel needs TP > 1")
    if lay.dp >= 1 and lay.world_size % mp == 0:
        per_step = lay.micro_batch_size * lay.dp
        need(lay.global_batch_size % per_step == 0,
             f"--global-batch-size {lay.global_batch_size} is not divisible by "
             f"--micro-batch-size {lay.micro_batch_size} x DP {lay.dp}")
        m = lay.num_microbatches
        if lay.vpp is not None:  # megatron-core's interleaved schedule
            need(m >= lay.pp, f"interleaved pipelining needs >= PP={lay.pp} micro-batches per "
                 f"step, got {m}: raise --global-batch-size")
            need(m % lay.pp == 0, f"{m} micro-batches per step is not a multiple of PP "
                 f"{lay.pp} (interleaved schedule): change --global-batch-size")
    multiple = 2 * lay.cp * (tp if lay.sequence_parallel else 1)
    need(lay.seq_length % multiple == 0,
         f"--seq-length {lay.seq_length} is not a multiple of 2*CP{'*TP' * lay.sequence_parallel}"
         f" = {multiple} (segment padding for context/sequence parallelism)")
    need(lay.seq_length % lay.pack_multiple == 0,
         f"--seq-length {lay.seq_length} is not a multiple of {lay.pack_multiple} "
         "(pack padding of the --fp8-recipe)")
    need(s.position_embedding_type != "learned_absolute"
         or s.max_position_embeddings >= lay.seq_length,
         "--max-position-embeddings is below --seq-length")
    _check_recompute(shape, lay, need)
    moe.check_moe_layout(shape, lay, need)
    need(not lay.fp8_param_gather or lay.fp8, "--fp8-param-gather needs --fp8-format")
    return errors


def _check_recompute(shape: ModelShape, lay: Layout, need) -> None:
    per_chunk = shape.num_layers // (lay.pp * lay.chunks) if shape.num_layers else 0
    if lay.recompute_granularity == "full":
        need(lay.recompute_method in ("uniform", "block"),
             "--recompute-granularity full needs --recompute-method uniform|block")
        k = lay.recompute_num_layers
        need(k is not None and 1 <= k <= max(per_chunk, 1),
             f"--recompute-num-layers {k} must be in [1, {per_chunk}] (layers per model chunk)")
    else:
        need(lay.recompute_method is None,
             "--recompute-method applies only to --recompute-granularity full")


def layer_params(shape: ModelShape, tp: int = 1, ep: int = 1,
                 etp: int | None = None) -> dict[str, int]:
    """Parameters of one transformer layer on one TP (and EP) rank, by module."""
    h, d, F = shape.hidden_size, shape.head_dim, shape.ffn_hidden_size
    q, kv = shape.num_attention_heads * d, shape.num_query_groups * d
    bias = int(shape.add_bias_linear)
    qkv_bias = int(shape.add_bias_linear or shape.add_qkv_bias)
    norm = h * (2 if shape.normalization == "LayerNorm" else 1)
    fc1_out = F * (2 if shape.swiglu else 1)
    out = {
        "input_norm": norm,
        "linear_qkv": (h * (q + 2 * kv) + qkv_bias * (q + 2 * kv)) // tp,
        "qk_norm": 2 * norm // h * d if shape.qk_layernorm else 0,
        "linear_proj": q * h // tp + bias * h,  # row-parallel: bias replicated
        "pre_mlp_norm": norm,
    }
    if moe.is_moe(shape):
        return {**out, **moe.moe_mlp_params(shape, tp, ep, etp)}
    return {**out, "linear_fc1": (h * fc1_out + bias * fc1_out) // tp,
            "linear_fc2": F * h // tp + bias * h}


def stage_params(shape: ModelShape, lay: Layout, pp_rank: int) -> dict[str, int]:
    """Parameters held by one GPU of pipeline rank ``pp_rank``, by part."""
    h, tp = shape.hidden_size, lay.tp
    vocab_shard = shape.padded_vocab(tp) // tp * h
    first, last = pp_rank == 0, pp_rank == lay.pp - 1
    per_layer = sum(layer_params(shape, tp, lay.ep, lay.etp).values())
    parts = {"layers": per_layer * (shape.num_layers // lay.pp)}
    parts["embedding"] = vocab_shard if first else 0
    if first and shape.position_embedding_type == "learned_absolute":
        parts["embedding"] += shape.max_position_embeddings * h
    parts["final_norm"] = layer_params(shape)["input_norm"] if last else 0
    # A tied output weight lives in the embedding on a single stage; PP > 1 keeps a copy.
    needs_output = shape.untie_embeddings or not first
    parts["output_layer"] = vocab_shard if (last and needs_output) else 0
    return parts


def params_total(shape: ModelShape, tp: int = 1) -> int:
    """Parameters of the whole model (each weight once), vocabulary padded for ``tp``."""
    per_layer = sum(layer_params(shape).values())
    vocab = shape.padded_vocab(tp) * shape.hidden_size
    total = shape.num_layers * per_layer + vocab + layer_params(shape)["input_norm"]
    if shape.position_embedding_type == "learned_absolute":
        total += shape.max_position_embeddings * shape.hidden_size
    return total + (vocab if shape.untie_embeddings else 0)


def gemm_params_per_layer(shape: ModelShape, tp: int, ep: int = 1, etp: int | None = None,
                          *, active: bool = False) -> int:
    """Weights of the GEMMs of one layer on one TP/EP rank (the ones TE casts to FP8);
    ``active``: those one token goes through (MoE: router, k experts, shared expert)."""
    plain = dataclasses.replace(shape, add_bias_linear=False, add_qkv_bias=False)
    lp = layer_params(plain, tp, ep, etp)
    attention = lp["linear_qkv"] + lp["linear_proj"]
    if not moe.is_moe(shape):
        return attention + lp["linear_fc1"] + lp["linear_fc2"]
    if active:
        return attention + moe.active_gemm_mlp_params(plain)
    return attention + lp["experts"] + lp["shared_expert"]


def activation_bytes_per_layer(shape: ModelShape, lay: Layout) -> float:
    """Bytes one layer keeps for backward per micro-batch, without recompute (module doc)."""
    h, d, F = shape.hidden_size, shape.head_dim, shape.ffn_hidden_size
    q, kv = shape.num_attention_heads * d, shape.num_query_groups * d
    if moe.is_moe(shape):  # k dispatched copies of each token through its experts
        F = moe.effective_ffn(shape)
    gemm_in = 1 if lay.fp8 else 2
    tokens = lay.seq_length * lay.micro_batch_size / lay.cp
    norms_in = 2 * h + 2 * h
    gemm_inputs = gemm_in * (h + q + h + F)  # QKV, proj, fc1, fc2 inputs
    inner = 2 * (q + 2 * kv) + 2 * F * (2 if shape.swiglu else 1)
    inner += 2 * h * shape.moe_router_topk if moe.is_moe(shape) else 0
    masks = 2 * h if lay.dropout else 0
    lse = 4 * shape.num_attention_heads  # flash attention's fp32 log-sum-exp per head
    if lay.sequence_parallel or lay.tp == 1:
        per_token = (norms_in + gemm_inputs + inner + masks + lse) / lay.tp
    else:  # norm inputs, QKV/fc1 inputs (norm outputs) and masks replicated over TP
        replicated = norms_in + gemm_in * 2 * h + masks
        per_token = replicated + (gemm_in * (q + F) + inner + lse) / lay.tp
    return per_token * tokens


def in_flight_layer_microbatches(shape: ModelShape, lay: Layout, pp_rank: int) -> float:
    """Layer-micro-batches whose activations pipeline rank ``pp_rank`` holds at its peak."""
    m, chunks, pp = lay.num_microbatches, lay.chunks, lay.pp
    total = m * chunks
    if pp == 1:
        warmup = 0
    elif lay.vpp is None:
        warmup = pp - pp_rank - 1
    else:  # megatron-core get_pp_rank_microbatches, microbatch_group_size_per_vp_stage = PP
        warmup = (pp - pp_rank - 1) * 2 + (chunks - 1) * pp
    live = min(warmup + 1, total)
    return live * shape.num_layers / (pp * chunks)


def activation_bytes(shape: ModelShape, lay: Layout, pp_rank: int) -> float:
    """Peak activation bytes on one GPU of pipeline rank ``pp_rank``, recompute applied."""
    per_layer = activation_bytes_per_layer(shape, lay)
    live_layers = in_flight_layer_microbatches(shape, lay, pp_rank)
    if lay.recompute_granularity != "full":
        # 'selective' recomputes core attention, which flash attention never stores.
        return per_layer * live_layers
    per_chunk = shape.num_layers // (lay.pp * lay.chunks)
    k = lay.recompute_num_layers or 1
    sp_div = lay.tp if lay.sequence_parallel else 1
    checkpoint = 2 * shape.hidden_size * lay.seq_length * lay.micro_batch_size / lay.cp / sp_div
    chunk_mbs = live_layers / per_chunk
    if lay.recompute_method == "uniform":
        stored = chunk_mbs * math.ceil(per_chunk / k) * checkpoint
        transient = k * per_layer  # one group re-run during backward
    else:  # block: the first k layers of each chunk keep only their input
        stored = chunk_mbs * (k * checkpoint + (per_chunk - k) * per_layer)
        transient = per_layer
    return stored + transient


# Tile of fused_logprobs.fused_vocab_parallel_logprobs (its defaults).
FUSED_CHUNK_TOKENS = 1024
FUSED_CHUNK_VOCAB = 8192


def logits_bytes(shape: ModelShape, lay: Layout) -> float:
    """Last stage's output-layer + log-prob working memory, in bytes.

    ``chunked``: bf16 logits ``[T, V/TP]`` and their gradient, plus one fp32 log-softmax
    block. ``fused``: no logits tensor; one logits tile in bf16 and fp32 and its fp32
    gradient, the fp32 hidden-state gradient ``[T, H]`` and one fp32 weight-gradient block
    ``[chunk_vocab, H]`` (backward, the larger of the two passes).
    """
    tokens = lay.seq_length * lay.micro_batch_size / lay.cp
    v_local = shape.padded_vocab(lay.tp) / lay.tp
    if lay.logprob_impl == "fused":
        tile = min(FUSED_CHUNK_TOKENS, tokens) * min(FUSED_CHUNK_VOCAB, v_local) * (2 + 4 + 4)
        return tile + tokens * shape.hidden_size * 4 + min(FUSED_CHUNK_VOCAB, v_local) * shape.hidden_size * 4
    block = min(lay.logprob_chunk_tokens, tokens) * v_local * 4 * 2  # fp32 block + exp temp
    return 2 * tokens * v_local * 2 + block


def memory_per_gpu(shape: ModelShape, lay: Layout, pp_rank: int) -> dict[str, float]:
    """Bytes per GPU of pipeline rank ``pp_rank``: weights, gradients, optimizer, ..."""
    n = sum(stage_params(shape, lay, pp_rank).values())
    gemm = gemm_params_per_layer(shape, lay.tp, lay.ep, lay.etp) * (shape.num_layers // lay.pp)
    w_bytes = 2 if lay.bf16 else 4
    if lay.fp8_param_gather:
        weights = (n - gemm) * w_bytes + gemm * 2.0  # FP8 weight + its transpose
    else:
        weights = n * w_bytes + (gemm * 2.0 if lay.fp8 else 0.0)  # TE's FP8 weight cache
    shard = lay.dp * lay.cp if lay.distributed_optimizer else 1
    trained = n
    activations = activation_bytes(shape, lay, pp_rank)
    if lay.lora_rank:  # frozen base: grads and Adam state for the adapters only
        from adadpo_megatron.planner.lora import lora_activation_bytes, lora_stage_params

        trained = lora_stage_params(shape, lay)
        weights += trained * w_bytes
        activations += lora_activation_bytes(
            lay, in_flight_layer_microbatches(shape, lay, pp_rank))
        optimizer = trained * (12 if lay.bf16 else 8) / shard  # fp32 master (bf16 only), m, v
    else:  # experts' state is sharded over the expert-data-parallel group
        optimizer = moe.adam_state_bytes(shape, lay, pp_rank, n, shard)
    last = pp_rank == lay.pp - 1
    parts = {
        "weights": weights,
        "gradients": trained * 4.0,  # fp32 main_grad buffers of megatron-core DDP
        "optimizer": optimizer,
        "activations": activations,
        "logits": logits_bytes(shape, lay) if last else 0.0,
        "reference": (n * 2.0 + (gemm * 2.0 if lay.fp8 else 0.0)) if lay.online_reference else 0.0,
    }
    parts["total"] = sum(parts.values())
    return parts


def flops_per_step(shape: ModelShape, lay: Layout, segment_length: int) -> dict[str, float]:
    """Model FLOPs of one optimizer step (policy forward + backward = 3x forward).

    Forward per token: 2 x (GEMM weights incl. the output layer) + causal attention
    ``2 * 2 * q_dim * L * ctx / 2`` with ``ctx`` the token's segment (packed segments of
    ``segment_length`` tokens attend within themselves). ``hardware`` adds the recompute
    forward and the online reference's forward.
    """
    d = shape.head_dim
    q = shape.num_attention_heads * d
    tokens = lay.global_batch_size * lay.seq_length
    weights = gemm_params_per_layer(shape, 1, active=True) * shape.num_layers + (
        shape.padded_vocab(lay.tp) * shape.hidden_size
    )
    attn_per_token = 2 * q * shape.num_layers * segment_length  # 4*q*L*ctx/2, mean ctx = seg/2
    forward = tokens * (2 * weights + attn_per_token)
    model = 3 * forward
    extra = forward if lay.recompute_granularity == "full" else 0.0
    if lay.online_reference or lay.base_reference:
        extra += forward
    return {"model": model, "hardware": model + extra, "tokens": tokens}


def plan(shape: ModelShape, lay: Layout, *, gpu_memory_gib: float = 80.0,
         segment_length: int | None = None) -> dict[str, Any]:
    """The planner's figures as one JSON-ready dict (see tools/plan_parallel.py --json).

    ``memory_gib_per_gpu`` is the pipeline rank with the largest total; ``per_stage`` lists
    every rank's total. ``fits`` is False on any layout error or when a stage exceeds
    ``gpu_memory_gib`` minus 10% headroom for the CUDA context, NCCL and fragmentation.
    """
    errors = check_layout(shape, lay)
    result: dict[str, Any] = {
        "errors": errors,
        "params_total": params_total(shape, lay.tp),
        "params_active": params_total(shape, lay.tp) - moe.inactive_params(shape),
        "params_total_unpadded": params_total(dataclasses.replace(
            shape, make_vocab_size_divisible_by=1)),
        "padded_vocab_size": shape.padded_vocab(lay.tp),
        "layout": {**dataclasses.asdict(lay), "dp": lay.dp},
    }
    if lay.lora_rank:
        from adadpo_megatron.planner.lora import lora_params_total

        result["trainable_params"] = lora_params_total(shape, lay.lora_rank, lay.lora_targets)
    if errors:
        return {**result, "fits": False}
    stages = [memory_per_gpu(shape, lay, r) for r in range(lay.pp)]
    worst = max(range(lay.pp), key=lambda r: stages[r]["total"])
    budget = gpu_memory_gib * 0.9
    flops = flops_per_step(shape, lay, segment_length or lay.seq_length // 2)
    return {
        **result,
        "num_microbatches": lay.num_microbatches,
        "params_per_gpu": sum(stage_params(shape, lay, worst).values()),
        "params_per_gpu_by_stage": [sum(stage_params(shape, lay, r).values())
                                    for r in range(lay.pp)],
        "peak_stage": worst,
        "memory_gib_per_gpu": {k: v / GIB for k, v in stages[worst].items()},
        "per_stage_total_gib": [st["total"] / GIB for st in stages],
        "gpu_memory_gib": gpu_memory_gib,
        "usable_gib": budget,
        "flops_per_step": flops["model"],
        "hardware_flops_per_step": flops["hardware"],
        "tokens_per_step": flops["tokens"],
        "fits": stages[worst]["total"] / GIB <= budget,
    }

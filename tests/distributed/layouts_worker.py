"""torchrun worker: preference loss + gradients on parallel layouts vs one process (gloo, CPU).

Every rank first computes the single-process reference itself: a TP=1/PP=1 GPTModel, each
sequence run alone (no packing, no padding), plain ``log_softmax`` + gather, the loss
averaged over all pairs of the global batch, one ``backward``. Then, for each case of the
JSON list in argv[1], it re-initialises megatron-core's parallel state with the case's
layout, builds the model chunks (megatron-core DDP), loads the reference weights sliced
by the sharding each parameter declares, runs megatron-core's forward_backward_func with
our forward_step on micro-batches of unequal numbers of pairs, and compares the loss and
every parameter's gradient. Then the step-0 invariant: with an online reference pass on
the same chunks, ``dpo`` and ratio-space ``adadpo`` give log 2 and zero rewards.
Format "shared": prefix-shared packs (the rejected segment reuses the chosen one's prompt)
through the prefix-sharing core attention; the reference is still each sequence alone,
i.e. the unshared run. Models: "llama" and "gpt" are small GPTModels (local layer spec); "tokenwise" is an
attention-free stand-in for the CP cases (megatron-core's local attention refuses CP).

Rank 0 prints one line ``RESULT {json}`` per case; the process exits non-zero on error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

VOCAB = 128
MAX_LEN = 128
NUM_PAIRS = 10
MODELS = {
    # Llama-like: RMSNorm, SwiGLU, GQA, RoPE, no biases, untied output layer.
    "llama": dict(
        num_layers=4,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=48,
        normalization="RMSNorm",
        swiglu=True,
        position_embedding_type="rope",
        add_bias_linear=False,
        untie_embeddings=True,
    ),
    # GPT-2-like: LayerNorm, GELU, biases, learned absolute positions, tied embeddings.
    "gpt": dict(
        num_layers=4,
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=64,
        normalization="LayerNorm",
        swiglu=False,
        position_embedding_type="learned_absolute",
        add_bias_linear=True,
        untie_embeddings=False,
    ),
}
LOSS = dict(name="adadpo", beta=0.5, balance_clip=1.5)


# ----------------------------------------------------------------------------- data
def make_pairs(seed: int = 7) -> list[dict]:
    """Random pairs: prompt 1-6 tokens, completions 1-8 tokens, a reference log-prob each."""
    g = torch.Generator().manual_seed(seed)

    def ri(lo, hi, n=None):
        return torch.randint(lo, hi + 1, (n,) if n else (1,), generator=g)

    pairs = []
    for i in range(NUM_PAIRS):
        plen = int(ri(1, 6))
        prompt = ri(1, VOCAB - 1, plen)
        seqs = [torch.cat([prompt, ri(1, VOCAB - 1, int(ri(1, 8)))]) for _ in range(2)]
        ref = torch.tensor([-4.8 * (len(s) - plen) for s in seqs]) + torch.randn(2, generator=g)
        pairs.append(dict(pair_index=100 + i, prompt_len=plen, seqs=seqs, ref=ref))
    return pairs


def _targets(seq: torch.Tensor, plen: int, length: int):
    """labels / loss_mask of one sequence padded to ``length`` (THD contract)."""
    n = len(seq)
    labels = torch.zeros(length, dtype=torch.long)
    labels[: n - 1] = seq[1:]
    mask = torch.zeros(length)
    mask[plen - 1 : n - 1] = 1.0
    return labels, mask


def packed_microbatch(pairs, seg_multiple=2, pad_to=None) -> dict:
    """One packed THD micro-batch (contract of interfaces.md), padding inside segments."""
    lens = [-(-len(s) // seg_multiple) * seg_multiple for p in pairs for s in p["seqs"]]
    if pad_to is not None:
        assert sum(lens) <= pad_to, (sum(lens), pad_to)
        lens[-1] += pad_to - sum(lens)
    cols = {k: [] for k in ("tokens", "position_ids", "labels", "loss_mask")}
    segments = [(p, s) for p in pairs for s in p["seqs"]]
    for (p, s), length in zip(segments, lens, strict=True):
        tok = torch.zeros(length, dtype=torch.long)
        tok[: len(s)] = s
        labels, mask = _targets(s, p["prompt_len"], length)
        for k, v in zip(cols, (tok, torch.arange(length), labels, mask), strict=True):
            cols[k].append(v)
    batch = {k: torch.cat(v) for k, v in cols.items()}
    batch["cu_seqlens"] = torch.tensor(
        [0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32
    )
    batch["max_seqlen"] = max(lens)
    batch["pair_index"] = torch.tensor([p["pair_index"] for p in pairs for _ in range(2)])
    batch["is_chosen"] = torch.tensor([True, False] * len(pairs))
    batch["ref_logps"] = torch.cat([p["ref"] for p in pairs])
    return batch


def shared_microbatch(pairs, seg_multiple=2, pad_to=None) -> dict:
    """One prefix-shared THD micro-batch (adadpo-pack --prefix-sharing layout).

    Per pair: the chosen sequence, then the rejected one without its first ``s`` tokens
    (``s`` = the shared prefix, data.prefix_layout.shared_prefix_len), positions from ``s``;
    ``shared_prefix_len [S]`` says what each rejected segment also attends to.
    """
    from adadpo_megatron.data.prefix_layout import shared_prefix_len

    skips = []
    for p in pairs:
        c, r = p["seqs"]
        skips += [0, shared_prefix_len(c.numpy(), r.numpy(), p["prompt_len"], p["prompt_len"])]
    segments = [(p, s) for p in pairs for s in p["seqs"]]
    lens = [-(-(len(s) - k) // seg_multiple) * seg_multiple
            for (_, s), k in zip(segments, skips, strict=True)]
    if pad_to is not None:
        assert sum(lens) <= pad_to, (sum(lens), pad_to)
        lens[-1] += pad_to - sum(lens)
    cols = {k: [] for k in ("tokens", "position_ids", "labels", "loss_mask")}
    for (p, s), length, k in zip(segments, lens, skips, strict=True):
        labels, mask = _targets(s, p["prompt_len"], length + k)
        tok = torch.zeros(length + k, dtype=torch.long)
        tok[: len(s)] = s
        pos = torch.arange(length + k)
        for key, v in zip(cols, (tok, pos, labels, mask), strict=True):
            cols[key].append(v[k:])
    batch = {k: torch.cat(v) for k, v in cols.items()}
    batch["cu_seqlens"] = torch.tensor(
        [0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32
    )
    batch["max_seqlen"] = max(lens)
    batch["shared_prefix_len"] = torch.tensor(skips)
    batch["pair_index"] = torch.tensor([p["pair_index"] for p in pairs for _ in range(2)])
    batch["is_chosen"] = torch.tensor([True, False] * len(pairs))
    batch["ref_logps"] = torch.cat([p["ref"] for p in pairs])
    return batch


def padded_microbatch(pairs, length=16) -> dict:
    """One padded [B, S] micro-batch: rows alternate chosen / rejected."""
    rows = [(p, s) for p in pairs for s in p["seqs"]]
    tokens = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.zeros_like(tokens)
    mask = torch.zeros(len(rows), length)
    for r, (p, s) in enumerate(rows):
        tokens[r, : len(s)] = s
        labels[r], mask[r] = _targets(s, p["prompt_len"], length)
    return dict(
        tokens=tokens,
        labels=labels,
        loss_mask=mask,
        pair_index=torch.tensor([p["pair_index"] for p in pairs for _ in range(2)]),
        is_chosen=torch.tensor([True, False] * len(pairs)),
        ref_logps=torch.cat([p["ref"] for p in pairs]),
    )


# ------------------------------------------------------------------------ models
def _tokenwise_model(config):
    """A GPTModel stand-in without attention, for CP (local attention refuses CP > 1).

    Same call signature and logits layout as GPTModel at TP=1; each token's logits depend
    on its own token and position only, so splitting the tokens over CP ranks is exact and
    the test isolates the CP reduction and the loss normalisation of the forward step.
    """
    from megatron.core.enums import ModelType
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.module import MegatronModule

    class TokenwiseLM(MegatronModule):
        share_embeddings_and_output_weights = False

        def __init__(self):
            super().__init__(config=config)
            self.model_type = ModelType.encoder_or_decoder
            self.embed = torch.nn.Embedding(VOCAB, config.hidden_size)
            self.pos = torch.nn.Embedding(MAX_LEN, config.hidden_size)
            # GPTModel's output layer, so that --logprob-impl fused takes its input.
            self.output_layer = ColumnParallelLinear(
                config.hidden_size, VOCAB, config=config, init_method=config.init_method,
                bias=False, gather_output=False,
            )  # fmt: skip

        def set_input_tensor(self, tensor):  # no pipeline stages
            pass

        def forward(self, input_ids, position_ids, attention_mask, labels=None, **kwargs):
            hidden = torch.tanh(self.embed(input_ids) + self.pos(position_ids))
            return self.output_layer(hidden)[0]

    return TokenwiseLM()


def build_single(model_name: str, **layout):
    """The whole model (one stage) for ``model_name`` under the current parallel state."""
    from adadpo_megatron.step.model import build_gpt_model, build_transformer_config

    if model_name == "tokenwise":
        return _tokenwise_model(
            build_transformer_config(num_layers=1, hidden_size=32, num_attention_heads=4, **layout)
        )
    return build_gpt_model(build_transformer_config(**MODELS[model_name], **layout), VOCAB, MAX_LEN)


# ------------------------------------------------------------------------ reference
def reference(model_name: str, pairs, loss_cfg) -> dict:
    """Single process: full weights, the mean loss over all pairs, and its gradients."""
    from adadpo_megatron.losses import compute_preference_loss, metric_reduction
    from adadpo_megatron.step.cpu import initialize_model_parallel_cpu

    initialize_model_parallel_cpu(tp=1, pp=1, seed=1234)
    model = build_single(model_name)
    sums, counts = [], []
    for p in pairs:
        for s in p["seqs"]:
            logits = model(s[None], torch.arange(len(s))[None], None)[0]  # [L, V]
            labels, mask = _targets(s, p["prompt_len"], len(s))
            logp = F.log_softmax(logits.float(), -1).gather(-1, labels[:, None])[:, 0]
            sums.append((logp * mask).sum())
            counts.append(mask.sum())
    sums, counts = torch.stack(sums), torch.stack(counts)
    ref = torch.cat([p["ref"] for p in pairs])
    losses, metrics = compute_preference_loss(
        loss_cfg, sums[0::2], sums[1::2], ref[0::2], ref[1::2], counts[0::2], counts[1::2]
    )
    losses.mean().backward()
    return dict(
        weights={n: p.detach().clone() for n, p in model.named_parameters()},
        grads={n: p.grad.detach().clone() for n, p in model.named_parameters()},
        metrics={
            k: float(v.max() if metric_reduction(k) == "max" else v.mean())
            for k, v in metrics.items()
        },
    )


# ------------------------------------------------------------------- weight mapping
def _global_name(chunk, local_name: str) -> str:
    """decoder.layers.<local i> -> decoder.layers.<global i>; tied output -> embedding."""
    parts = local_name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(chunk.decoder.layers[int(parts[2])].layer_number - 1)
    name = ".".join(parts)
    if name == "output_layer.weight" and chunk.share_embeddings_and_output_weights:
        return "embedding.word_embeddings.weight"
    return name


def _shard(full: torch.Tensor, param, name: str, gated: bool) -> torch.Tensor:
    """This TP rank's slice of a full tensor, by the sharding the parameter declares."""
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False):
        return full
    tp, rank, dim = (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_tensor_model_parallel_rank(),
        param.partition_dim,
    )
    if gated and "mlp.linear_fc1" in name:  # [gate; up] on each rank, not a contiguous slice
        return torch.cat([h.chunk(tp, dim)[rank] for h in full.chunk(2, dim)], dim)
    return full.chunk(tp, dim)[rank]


def local_params(chunks):
    """(global name, local param, unwrapped chunk, local name) of this rank's parameters."""
    for ddp in chunks:
        chunk = ddp.module
        for name, param in chunk.named_parameters():
            yield _global_name(chunk, name), param, name


def load_weights(chunks, weights, gated):
    with torch.no_grad():
        for gname, param, name in local_params(chunks):
            shard = _shard(weights[gname], param, name, gated)
            assert shard.shape == param.shape, (name, shard.shape, param.shape)
            param.copy_(shard)


def grad_errors(chunks, ref_grads, gated) -> tuple[float, list[str]]:
    worst, names = 0.0, []
    for gname, param, name in local_params(chunks):
        want = _shard(ref_grads[gname], param, name, gated)
        got = param.main_grad
        err = float((got - want).abs().max() / want.abs().max().clamp(min=1e-8))
        worst = max(worst, err if math.isfinite(err) else math.inf)  # NaN must not pass
        names.append(gname)
    return worst, names


# ------------------------------------------------------------------------ one case
def _microbatches(case, pairs, dp_rank, dp_size):
    """Round-robin the case's micro-batch sizes over DP ranks; returns this rank's batches."""
    sizes, mbs, start = case["mb_pairs"], [], 0
    for j, n in enumerate(sizes):
        group = pairs[start : start + n]
        start += n
        if j % dp_size != dp_rank:
            continue
        # Segments padded to 2*CP, times TP under sequence parallelism (DESIGN.md).
        seg_multiple = 2 * case.get("cp", 1) * (case.get("tp", 1) if case.get("sp") else 1)
        if case["fmt"] == "packed":
            mbs.append(packed_microbatch(group, seg_multiple, pad_to=case.get("pad_to")))
        elif case["fmt"] == "shared":
            mbs.append(shared_microbatch(group, seg_multiple, pad_to=case.get("pad_to")))
        else:
            mbs.append(padded_microbatch(group))
    assert start == len(pairs), "the micro-batches must cover the global batch"
    return mbs


def _run(chunks, forward_step, mbs, forward_only=False, collect_non_loss_data=False):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from adadpo_megatron.step.batch import schedule_shape

    seq_length, mbs_size = schedule_shape(mbs[0])
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(mbs) for _ in chunks],
        model=chunks,
        num_microbatches=len(mbs),
        seq_length=seq_length,
        micro_batch_size=mbs_size,
        forward_only=forward_only,
        collect_non_loss_data=collect_non_loss_data,
    )


def build_layout(case) -> list:
    """Parallel state for the case's layout, then this rank's DDP-wrapped model chunks."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from adadpo_megatron.step.cpu import initialize_model_parallel_cpu
    from adadpo_megatron.step.model import build_model_chunks, build_transformer_config

    layout = dict(
        tp=case.get("tp", 1), pp=case.get("pp", 1), vpp=case.get("vpp"), cp=case.get("cp", 1)
    )
    initialize_model_parallel_cpu(**layout, seed=99)
    options = dict(
        variable_seq_lengths=case.get("variable_seq_lengths", False),
        calculate_per_token_loss=case.get("per_token", False),
        sequence_parallel=case.get("sp", False),
        # "recompute": [granularity, method, num_layers] (method/num_layers: full only).
        **dict(zip(("recompute_granularity", "recompute_method", "recompute_num_layers"),
                   case.get("recompute", []), strict=False)),
    )
    if case["model"] == "tokenwise":
        module = build_single("tokenwise", **layout, **options)
        module.config.finalize_model_grads_func = finalize_model_grads
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
        return [DistributedDataParallel(module.config, ddp_config, module)]
    config = build_transformer_config(**MODELS[case["model"]], **layout, **options)
    config.finalize_model_grads_func = finalize_model_grads
    if case["fmt"] == "shared":  # what the trainer does for a --prefix-sharing dataset
        config.adadpo_gpt_options = dataclasses.replace(
            config.adadpo_gpt_options, prefix_attention="mask"
        )
    return build_model_chunks(config, VOCAB, MAX_LEN, wrap_ddp=True)


_RECOMPUTED = [0]  # megatron-core checkpoint() calls (activation recompute) in this case


def _count_recompute() -> None:
    """Counts ``tensor_parallel.checkpoint`` calls (selective and full recompute use it)."""
    from megatron.core import tensor_parallel

    original = tensor_parallel.checkpoint

    def counted(*args, **kwargs):
        _RECOMPUTED[0] += 1
        return original(*args, **kwargs)

    tensor_parallel.checkpoint = counted


def run_case(case, pairs, refs) -> dict:
    from megatron.core import parallel_state as ps

    from adadpo_megatron.losses import LossConfig
    from adadpo_megatron.step.forward_step import (
        StepContext,
        attach_reference_logps,
        make_forward_step,
        make_reference_forward_step,
        reduce_metrics,
    )

    t0 = time.time()
    _RECOMPUTED[0] = 0
    chunks = build_layout(case)
    ref = refs[case["model"]]
    gated = MODELS.get(case["model"], {}).get("swiglu", False)
    load_weights(chunks, ref["weights"], gated)
    use_thd = case.get("cp", 1) > 1  # CP needs the THD path (the tokenwise model ignores it)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mbs = _microbatches(case, pairs, dp_rank, dp_size)
    step = StepContext(num_microbatches=len(mbs), global_num_pairs=len(pairs))
    # Both --logprob-impl paths: each against the single process, and fused vs chunked.
    per_impl = {}
    for impl in ("chunked", "fused"):
        for c in chunks:
            c.zero_grad_buffer()
        fwd = make_forward_step(LossConfig(**LOSS), step, use_thd=use_thd, logprob_impl=impl)
        metrics = reduce_metrics(_run(chunks, fwd, mbs))
        grad_err, names = grad_errors(chunks, ref["grads"], gated)
        grads = [p.main_grad.detach().clone() for _, p, _ in local_params(chunks)]
        per_impl[impl] = (metrics, grad_err, grads)
    metrics, grad_err, grads = per_impl["fused"]
    chunked_metrics, chunked_err, chunked_grads = per_impl["chunked"]
    # fused vs chunked: largest gradient difference relative to the parameter's largest.
    impl_err = max(
        float((a - b).abs().max() / b.abs().max().clamp(min=1e-8))
        for a, b in zip(grads, chunked_grads, strict=True)
    )

    # Step 0: the policy is its own reference (online reference pass through the same path).
    step0 = {}
    for loss_kw in (
        dict(name="dpo", beta=0.1),
        dict(name="adadpo", beta=0.1, balance_space="ratio"),
    ):
        for mb in mbs:
            mb.pop("ref_logps", None)
        attach_reference_logps(
            mbs,
            _run(
                chunks,
                make_reference_forward_step(use_thd=use_thd),
                mbs,
                forward_only=True,
                collect_non_loss_data=True,
            ),
        )
        m0 = reduce_metrics(
            _run(
                chunks,
                make_forward_step(LossConfig(**loss_kw), step, use_thd=use_thd),
                mbs,
                forward_only=True,
            )
        )
        step0[loss_kw["name"]] = (
            {k: float(m0[k]) for k in ("loss", "rewards/chosen", "rewards/rejected")} if m0 else {}
        )

    out = dict(grad_rel_err=max(grad_err, chunked_err), params=names, impl_grad_err=impl_err,
               elapsed=time.time() - t0, recomputed=_RECOMPUTED[0])
    if metrics:  # last pipeline stage
        out["impl_loss_err"] = abs(float(metrics["loss"]) - float(chunked_metrics["loss"]))
        # Relative for metrics of magnitude > 1, absolute below (accuracies, log-ratios ~ 0).
        errs = [abs(float(metrics[k]) - v) / max(abs(v), 1.0) for k, v in ref["metrics"].items()]
        out["metric_err"] = max(e if math.isfinite(e) else math.inf for e in errs)
        out["metric_names"] = sorted(metrics)
        out["loss"] = float(metrics["loss"])
        out["step0"] = step0
    return out


def _gather_case(result: dict) -> dict:
    """Combine the per-rank results: worst errors, union of parameters, last-stage values."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, result)
    merged = dict(
        grad_rel_err=max(r["grad_rel_err"] for r in everyone),
        impl_grad_err=max(r["impl_grad_err"] for r in everyone),
        params_covered=sorted({n for r in everyone for n in r["params"]}),
        elapsed=max(r["elapsed"] for r in everyone),
        recomputed=min(r["recomputed"] for r in everyone),
    )
    last = [r for r in everyone if "loss" in r]
    merged["metric_err"] = max(r["metric_err"] for r in last)
    merged["metric_names"] = last[0]["metric_names"]
    merged["loss"] = [r["loss"] for r in last]
    merged["impl_loss_err"] = max(r["impl_loss_err"] for r in last)
    merged["step0"] = [r["step0"] for r in last]
    return merged


def main() -> int:
    from adadpo_megatron.losses import LossConfig
    from adadpo_megatron.step.cpu import init_distributed_cpu

    init_distributed_cpu()
    _count_recompute()
    cases = json.loads(sys.argv[1])
    pairs = make_pairs()
    refs = {m: reference(m, pairs, LossConfig(**LOSS)) for m in sorted({c["model"] for c in cases})}
    for case in cases:
        merged = _gather_case(run_case(case, pairs, refs))
        covered = set(merged.pop("params_covered"))
        merged["params_missing"] = sorted(set(refs[case["model"]]["weights"]) - covered)
        merged["num_params"] = len(covered)
        merged["ref_loss"] = refs[case["model"]]["metrics"]["loss"]
        merged["ref_metric_names"] = sorted(refs[case["model"]]["metrics"])
        if dist.get_rank() == 0:
            print("RESULT " + json.dumps({"case": case["name"], **merged}), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

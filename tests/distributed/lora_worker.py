"""torchrun worker: LoRA loss + every adapter gradient on parallel layouts vs one process.

Reuses ``layouts_worker``'s data and weight slicing. The single-process reference is a
TP=1/PP=1 model with adapters (rank 4, alpha 8) whose B factors are set to non-zero
values (so that A gets a gradient), each sequence run alone. Each case of argv[1]:
parallel state for its layout -> this rank's chunks -> base weights sliced in ->
``add_lora`` -> adapter weights sliced in -> megatron-core DDP -> forward_backward_func
with our forward step (fused and chunked log-probs) -> loss, metrics and every adapter
gradient compared, and every base parameter checked frozen (no requires_grad, no
main_grad, not in the optimizer). Then reference = base: a forward-only pass with the
adapters switched off gives ``ref_logps``; with B zeroed, ``dpo`` gives ln 2 exactly.

Model "mlp": an attention-free stand-in (tokenwise: embedding -> linear_fc1 column-parallel
-> GELU -> linear_fc2 row-parallel -> output layer) for CP (local attention refuses CP)
and for sequence parallelism (megatron-core's local norms refuse SP; this model has none
and runs megatron-core's own SP scatter / all-gather / reduce-scatter inside its linears).

Rank 0 prints ``RESULT {json}`` per case.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from layouts_worker import (  # noqa: E402
    LOSS,
    MAX_LEN,
    MODELS,
    VOCAB,
    _global_name,
    _run,
    _shard,
    _targets,
    make_pairs,
    packed_microbatch,
    shared_microbatch,
)

LORA = dict(rank=4, alpha=8.0)


def _mlp_model(config):
    """Tokenwise stand-in with LoRA targets; runs SP like GPTModel (scatter after the
    embedding, the output layer all-gathers)."""
    from megatron.core.enums import ModelType
    from megatron.core.tensor_parallel import (
        ColumnParallelLinear,
        RowParallelLinear,
        scatter_to_sequence_parallel_region,
    )
    from megatron.core.transformer.module import MegatronModule

    class MlpLM(MegatronModule):
        share_embeddings_and_output_weights = False

        def __init__(self):
            super().__init__(config=config)
            self.model_type = ModelType.encoder_or_decoder
            h = config.hidden_size
            self.embed = torch.nn.Embedding(VOCAB, h)
            self.pos = torch.nn.Embedding(MAX_LEN, h)
            kw = dict(config=config, init_method=config.init_method, bias=True)
            self.linear_fc1 = ColumnParallelLinear(h, 2 * h, gather_output=False, **kw)
            self.linear_fc2 = RowParallelLinear(2 * h, h, input_is_parallel=True,
                                                skip_bias_add=False, **kw)
            self.output_layer = ColumnParallelLinear(h, VOCAB, config=config, bias=False,
                                                     init_method=config.init_method,
                                                     gather_output=False)

        def set_input_tensor(self, tensor):
            pass

        def forward(self, input_ids, position_ids, attention_mask, labels=None, **kwargs):
            x = torch.tanh(self.embed(input_ids) + self.pos(position_ids)).transpose(0, 1)
            if config.sequence_parallel:
                x = scatter_to_sequence_parallel_region(x)
            x = x + self.linear_fc2(F.gelu(self.linear_fc1(x)[0]))[0]
            return self.output_layer(x)[0].transpose(0, 1).contiguous()

    return MlpLM()


def build_single(model_name: str, **layout):
    from adadpo_megatron.step.model import build_gpt_model, build_transformer_config

    if model_name == "mlp":
        return _mlp_model(build_transformer_config(num_layers=1, hidden_size=32,
                                                   num_attention_heads=4, **layout))
    return build_gpt_model(build_transformer_config(**MODELS[model_name], **layout), VOCAB,
                           MAX_LEN)


def _settings():
    from adadpo_megatron.step.lora import LoRASettings

    return LoRASettings(**LORA)


def reference(model_name: str, pairs, loss_cfg) -> dict:
    """Single process: base + adapters (B != 0), mean loss over all pairs, adapter grads."""
    from adadpo_megatron.losses import compute_preference_loss, metric_reduction
    from adadpo_megatron.step.cpu import initialize_model_parallel_cpu
    from adadpo_megatron.step.lora import adapter_modules, add_lora

    initialize_model_parallel_cpu(tp=1, pp=1, seed=1234)
    model = build_single(model_name)
    add_lora([model], _settings(), seed=5)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, _, a in adapter_modules(model):
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.05)
    sums, counts = [], []
    for p in pairs:
        for s in p["seqs"]:
            logits = model(s[None], torch.arange(len(s))[None], None)[0]
            labels, mask = _targets(s, p["prompt_len"], len(s))
            logp = F.log_softmax(logits.float(), -1).gather(-1, labels[:, None])[:, 0]
            sums.append((logp * mask).sum())
            counts.append(mask.sum())
    sums, counts = torch.stack(sums), torch.stack(counts)
    ref = torch.cat([p["ref"] for p in pairs])
    losses, metrics = compute_preference_loss(
        loss_cfg, sums[0::2], sums[1::2], ref[0::2], ref[1::2], counts[0::2], counts[1::2])
    losses.mean().backward()
    return dict(
        weights={n: p.detach().clone() for n, p in model.named_parameters()},
        grads={n: p.grad.detach().clone() for n, p in model.named_parameters()
               if p.grad is not None},
        metrics={k: float(v.max() if metric_reduction(k) == "max" else v.mean())
                 for k, v in metrics.items()})


def build_layout(case, ref) -> list:
    """This rank's chunks: base weights, adapters, adapter weights, then megatron DDP."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from adadpo_megatron.step.cpu import initialize_model_parallel_cpu
    from adadpo_megatron.step.lora import add_lora
    from adadpo_megatron.step.model import build_model_chunks, build_transformer_config

    layout = dict(tp=case.get("tp", 1), pp=case.get("pp", 1), cp=case.get("cp", 1))
    initialize_model_parallel_cpu(**layout, seed=99)
    options = dict(sequence_parallel=case.get("sp", False))
    if case["model"] == "mlp":
        chunks = [build_single("mlp", **layout, **options)]
    else:
        import dataclasses

        config = build_transformer_config(**MODELS[case["model"]], **layout, **options)
        if case["fmt"] == "shared":
            config.adadpo_gpt_options = dataclasses.replace(
                config.adadpo_gpt_options, prefix_attention="mask")
        chunks = build_model_chunks(config, VOCAB, MAX_LEN, wrap_ddp=False)
    add_lora(chunks, _settings(), seed=5)
    gated = MODELS.get(case["model"], {}).get("swiglu", False)
    with torch.no_grad():
        for chunk in chunks:
            for name, param in chunk.named_parameters():
                shard = _shard(ref["weights"][_global_name(chunk, name)], param, name, gated)
                assert shard.shape == param.shape, (name, shard.shape, param.shape)
                param.copy_(shard)
    out = []
    for i, chunk in enumerate(chunks):
        chunk.config.finalize_model_grads_func = finalize_model_grads
        out.append(DistributedDataParallel(
            config=chunk.config, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
            module=chunk, disable_bucketing=i > 0))
    return out


def _adapter_params(chunks):
    for ddp in chunks:
        for name, param in ddp.module.named_parameters():
            yield _global_name(ddp.module, name), name, param


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
    from adadpo_megatron.step.lora import adapter_modules, adapters_disabled

    t0 = time.time()
    ref = refs[case["model"]]
    chunks = build_layout(case, ref)
    gated = MODELS.get(case["model"], {}).get("swiglu", False)
    use_thd = case.get("cp", 1) > 1
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mbs = []
    start = 0
    for j, n in enumerate(case["mb_pairs"]):
        group, start = pairs[start:start + n], start + n
        if j % dp_size == dp_rank:
            make = shared_microbatch if case["fmt"] == "shared" else packed_microbatch
            mbs.append(make(group, 2 * case.get("cp", 1), pad_to=case.get("pad_to")))
    step = StepContext(num_microbatches=len(mbs), global_num_pairs=len(pairs))
    worst, worst_name, names, frozen_ok, metrics = 0.0, '', set(), True, {}
    for impl in ("chunked", "fused"):
        for c in chunks:
            c.zero_grad_buffer()
        fwd = make_forward_step(LossConfig(**LOSS), step, use_thd=use_thd, logprob_impl=impl)
        metrics[impl] = reduce_metrics(_run(chunks, fwd, mbs))
        for gname, name, param in _adapter_params(chunks):
            if ".adapter." not in name:
                frozen_ok &= not param.requires_grad and getattr(param, "main_grad", None) is None
                continue
            want = _shard(ref["grads"][gname], param, name, gated)
            err = float((param.main_grad - want).abs().max() / want.abs().max().clamp(min=1e-8))
            err = err if math.isfinite(err) else math.inf
            if err >= worst:
                worst, worst_name = err, f"{impl}:{gname}"
            names.add(gname)
    # Reference = base: adapters off (forward only); then B = 0 makes policy == base.
    for mb in mbs:
        mb.pop("ref_logps", None)
    with adapters_disabled(chunks):
        attach_reference_logps(mbs, _run(chunks, make_reference_forward_step(use_thd=use_thd),
                                         mbs, forward_only=True, collect_non_loss_data=True))
    with torch.no_grad():
        for c in chunks:
            for _, _, a in adapter_modules(c):
                a.lora_B.zero_()
    m0 = reduce_metrics(_run(chunks, make_forward_step(LossConfig(name="dpo", beta=0.1), step,
                                                       use_thd=use_thd), mbs, forward_only=True))
    out = dict(grad_rel_err=worst, worst=worst_name, params=sorted(names), frozen_ok=frozen_ok,
               elapsed=time.time() - t0)
    if metrics["fused"]:
        errs = [abs(float(metrics[impl][k]) - v) / max(abs(v), 1.0)
                for impl in metrics for k, v in ref["metrics"].items()]
        out["metric_err"] = max(e if math.isfinite(e) else math.inf for e in errs)
        out["loss"] = float(metrics["fused"]["loss"])
        out["step0"] = {k: float(m0[k]) for k in ("loss", "rewards/chosen", "rewards/rejected")}
    return out


def main() -> int:
    from adadpo_megatron.losses import LossConfig
    from adadpo_megatron.step.cpu import init_distributed_cpu

    init_distributed_cpu()
    cases = json.loads(sys.argv[1])
    pairs = make_pairs()
    refs = {m: reference(m, pairs, LossConfig(**LOSS)) for m in sorted({c["model"] for c in cases})}
    for case in cases:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, run_case(case, pairs, refs))
        last = [r for r in everyone if "loss" in r]
        want = sorted(n for n in refs[case["model"]]["grads"])
        merged = dict(
            case=case["name"], grad_rel_err=max(r["grad_rel_err"] for r in everyone),
            worst=max(everyone, key=lambda r: r["grad_rel_err"])["worst"],
            frozen_ok=all(r["frozen_ok"] for r in everyone),
            params_missing=sorted(set(want) - {n for r in everyone for n in r["params"]}),
            num_adapter_params=len(want), metric_err=max(r["metric_err"] for r in last),
            loss=[r["loss"] for r in last], ref_loss=refs[case["model"]]["metrics"]["loss"],
            step0=[r["step0"] for r in last], elapsed=max(r["elapsed"] for r in everyone))
        if dist.get_rank() == 0:
            print("RESULT " + json.dumps(merged), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""torchrun worker: a mixture-of-experts GPTModel on EP / TP / PP / DP layouts vs one process.

Every rank first computes the single-process reference: TP=PP=EP=1, no DDP, the four
packed micro-batches of the global batch run one after the other through our forward step
(preference loss normalised over all pairs) with megatron-core's load-balancing loss
scaled as the schedule scales it for one process (``1 / num_microbatches``); gradients
accumulate in ``.grad``. Each case of argv[1] then re-initialises megatron-core's parallel
state with an expert-parallel layout, loads the reference weights split by the converter
(``conversion.weights.split``, the same code that writes Megatron-LM's per-rank files),
deals the micro-batches to the DP ranks, runs megatron-core's schedule + DDP, and
compares: the preference loss, ``moe/aux_loss`` (trainer/moe_metrics.py) and every
gradient (gathered from all ranks and merged back with ``conversion.weights.merge``).
Then step 0: an online reference pass on the same chunks (eval mode) makes policy ==
reference and ``dpo`` must give log 2.

Rank 0 prints one line ``RESULT {json}`` per case. By hand:
``torchrun --nproc-per-node 2 tests/distributed/moe_worker.py '[{"name": "ep2", "ep": 2}]'``
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
from layouts_worker import MAX_LEN, VOCAB, make_pairs, packed_microbatch  # noqa: E402

# Qwen3-MoE-like: RMSNorm, GQA, q/k norm, RoPE, 4 SwiGLU experts, top-2, untied output,
# plus a shared expert (Qwen2-MoE / DeepSeek style) that every token also goes through.
MOE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
           ffn_hidden_size=48, normalization="RMSNorm", swiglu=True,
           position_embedding_type="rope", add_bias_linear=False, untie_embeddings=True,
           qk_layernorm=True, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
           moe_aux_loss_coeff=0.5, moe_router_load_balancing_type="aux_loss",
           moe_shared_expert_intermediate_size=16)
MB_PAIRS = [3, 2, 3, 2]  # pairs per micro-batch of the global batch (10 pairs)
PAD_TO = 96  # one length for every micro-batch (pipeline stages exchange fixed shapes)
LOSS = dict(name="adadpo", beta=0.5, balance_clip=1.5)


def _shape():
    from adadpo_megatron.conversion.weights import LlamaShape

    return LlamaShape(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
                      num_query_groups=2, head_dim=8, vocab_size=VOCAB, tie_embeddings=False,
                      family="qwen3_moe", num_experts=4, moe_router_topk=2,
                      moe_ffn_hidden_size=32)


def microbatches(pairs) -> list[dict]:
    out, start = [], 0
    for n in MB_PAIRS:
        out.append(packed_microbatch(pairs[start:start + n], 2, pad_to=PAD_TO))
        start += n
    return out


def _tracked_aux(clear: bool = True) -> float:
    """Sum over layers and micro-batches of the tracker's ``aux_loss / coeff`` (no reduction)."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    entry = get_moe_layer_wise_logging_tracker().get("load_balancing_loss")
    value = float(entry["values"].sum()) if entry else 0.0
    if entry and clear:
        entry["values"].zero_()
    return value


def reference(pairs) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from adadpo_megatron.losses import LossConfig
    from adadpo_megatron.step.cpu import initialize_model_parallel_cpu
    from adadpo_megatron.step.forward_step import StepContext, make_forward_step
    from adadpo_megatron.step.model import build_gpt_model, build_transformer_config

    initialize_model_parallel_cpu(tp=1, pp=1, seed=1234)
    model = build_gpt_model(build_transformer_config(**MOE), VOCAB, MAX_LEN)
    from adadpo_megatron.trainer.moe_metrics import watch_routers

    assert watch_routers([model]) == MOE["num_layers"]
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()
               if isinstance(v, torch.Tensor)}
    mbs = microbatches(pairs)
    m = len(mbs)
    fwd = make_forward_step(LossConfig(**LOSS), StepContext(num_microbatches=m,
                                                            global_num_pairs=len(pairs)),
                            use_thd=False, logprob_impl="chunked")
    # _loss_func multiplies by DP*CP*M (the schedule and DDP divide it back): undo it here.
    undo = ps.get_data_parallel_world_size() * m
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1) / m)  # the schedule's, one process
    _tracked_aux()
    total = 0.0
    for mb in mbs:
        output, loss_func = fwd(iter([mb]), model)
        loss, _, report = loss_func(output)
        (loss / undo).backward()
        total += float(report["loss"][0])
    aux = _tracked_aux() * MOE["moe_aux_loss_coeff"] / m
    loads = [mod._adadpo_expert_load for mod in model.modules()
             if hasattr(mod, "_adadpo_expert_load")]
    imbalance = sum(float(x.max() / x.mean()) for x in loads) / len(loads)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return dict(weights=weights, grads=grads, loss=total / len(pairs), aux=aux,
                imbalance=imbalance)


def build_layout(case) -> list:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    from adadpo_megatron.step.cpu import seed_cpu
    from adadpo_megatron.step.model import build_model_chunks, build_transformer_config

    tp, pp, ep = case.get("tp", 1), case.get("pp", 1), case["ep"]
    etp = case.get("etp", tp)
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
    seed_cpu(99)
    config = build_transformer_config(
        **MOE, tp=tp, pp=pp, sequence_parallel=case.get("sp", False),
        expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
        moe_token_dispatcher_type=case.get("dispatcher", "allgather"))
    config.finalize_model_grads_func = finalize_model_grads
    return build_model_chunks(config, VOCAB, MAX_LEN, wrap_ddp=True)


def _rank_keys() -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Converter shard keys of this rank: (TP, PP, EP) for dense tensors, (ETP, PP, EP) for
    expert tensors (the same unless --expert-tensor-parallel-size differs from TP)."""
    from megatron.core import parallel_state as ps

    pp, ep = ps.get_pipeline_model_parallel_rank(), ps.get_expert_model_parallel_rank()
    return (ps.get_tensor_model_parallel_rank(), pp, ep), (ps.get_expert_tensor_parallel_rank(),
                                                           pp, ep)


def _is_expert(name: str) -> bool:
    return ".local_experts." in name


def _shard(full, shape, case, key, expert_key):
    """This rank's weights: dense tensors split over TP, expert tensors over ETP."""
    from adadpo_megatron.conversion.weights import split

    tp, pp, ep = case.get("tp", 1), case.get("pp", 1), case["ep"]
    dense = split(full, shape, tp=tp, pp=pp, ep=ep)[key][0]
    experts = split(full, shape, tp=case.get("etp", tp), pp=pp, ep=ep)[expert_key][0]
    return {k: experts[k] if _is_expert(k) else v for k, v in dense.items()}


def _merge(everyone, shape):
    """Full gradients from every rank's (dense key, expert key, grads)."""
    from adadpo_megatron.conversion.weights import merge

    dense = merge({k: [g] for k, _, g in everyone}, shape)
    experts = merge({k: [g] for _, k, g in everyone}, shape)
    return {n: experts[n] if _is_expert(n) else g for n, g in dense.items()}


def _planned_params(case, pp_rank: int) -> int:
    """The planner's parameter count for this rank of the case's layout.

    The models here have exactly ``VOCAB`` rows at every TP (no padding), i.e. Megatron-LM's
    ``--make-vocab-size-divisible-by VOCAB // TP``; the planner's default (128 x TP) would
    count 256 rows at TP=2."""
    from adadpo_megatron.planner.estimate import Layout, ModelShape, stage_params

    tp = case.get("tp", 1)
    shape = ModelShape(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
                       num_query_groups=2, vocab_size=VOCAB, qk_layernorm=True, num_experts=4,
                       moe_router_topk=2, moe_ffn_hidden_size=32,
                       moe_shared_expert_intermediate_size=16,
                       make_vocab_size_divisible_by=VOCAB // tp)
    lay = Layout(tp=tp, pp=case.get("pp", 1), ep=case["ep"], etp=case.get("etp"),
                 sequence_parallel=case.get("sp", False), world_size=dist.get_world_size())
    return sum(stage_params(shape, lay, pp_rank).values())


def run_case(case, pairs, ref) -> dict:
    from megatron.core import parallel_state as ps

    from adadpo_megatron.conversion.weights import load_into_model
    from adadpo_megatron.losses import LossConfig
    from adadpo_megatron.step.forward_step import (
        StepContext,
        attach_reference_logps,
        make_forward_step,
        make_reference_forward_step,
        reduce_metrics,
    )
    from adadpo_megatron.trainer.loop import _schedule
    from adadpo_megatron.trainer.moe_metrics import moe_step_metrics, watch_routers

    t0 = time.time()
    chunks = build_layout(case)
    shape, (key, expert_key) = _shape(), _rank_keys()
    load_into_model(chunks[0].module, _shard(ref["weights"], shape, case, key, expert_key))
    planned = _planned_params(case, key[1])
    real = sum(p.numel() for p in chunks[0].module.parameters())
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mbs = [mb for j, mb in enumerate(microbatches(pairs)) if j % dp_size == dp_rank]
    step = StepContext(num_microbatches=len(mbs), global_num_pairs=len(pairs))
    fwd = make_forward_step(LossConfig(**LOSS), step, use_thd=False, logprob_impl="fused")
    _tracked_aux()
    watch_routers(chunks)
    chunks[0].zero_grad_buffer()
    metrics = reduce_metrics(_schedule(chunks, fwd, mbs, forward_only=False))
    moe_metrics = moe_step_metrics(MOE["moe_aux_loss_coeff"], len(mbs), chunks)
    aux, imbalance = moe_metrics["moe/aux_loss"], moe_metrics["moe/load_imbalance"]
    mine = {n: p.main_grad.detach().clone() for n, p in chunks[0].module.named_parameters()}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (key, expert_key, mine))
    grads = _merge(everyone, shape)
    worst, missing = 0.0, sorted(set(ref["grads"]) - set(grads))
    for name, want in ref["grads"].items():
        if name in grads:
            err = float((grads[name] - want).abs().max() / want.abs().max().clamp(min=1e-8))
            worst = max(worst, err if math.isfinite(err) else math.inf)
    # Step 0: the same chunks as their own (eval-mode) reference.
    for mb in mbs:
        mb.pop("ref_logps", None)
    for c in chunks:
        c.eval()
    attach_reference_logps(mbs, _schedule(chunks, make_reference_forward_step(use_thd=False),
                                          mbs, forward_only=True, collect_non_loss_data=True))
    leaked = _tracked_aux(clear=False)  # eval mode: the router records no aux loss
    for c in chunks:
        c.train()
    m0 = reduce_metrics(_schedule(chunks, make_forward_step(
        LossConfig(name="dpo", beta=0.1), step, use_thd=False), mbs, forward_only=True))
    out = dict(planned=planned, real=real, imbalance=imbalance, grad_rel_err=worst, missing=missing, aux=aux, ref_aux=ref["aux"],
               ref_loss=ref["loss"], aux_in_eval=leaked, elapsed=time.time() - t0)
    if metrics:
        out.update(loss=float(metrics["loss"]), step0=float(m0["loss"]))
    return out


def main() -> int:
    from adadpo_megatron.step.cpu import init_distributed_cpu

    init_distributed_cpu()
    cases = json.loads(sys.argv[1])
    pairs = make_pairs()
    ref = reference(pairs)
    for case in cases:
        result = run_case(case, pairs, ref)
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, result)
        last = [r for r in everyone if "loss" in r]
        merged = dict(case=case["name"], grad_rel_err=max(r["grad_rel_err"] for r in everyone),
                      missing=everyone[0]["missing"], aux=[r["aux"] for r in everyone],
                      ref_aux=ref["aux"], loss=[r["loss"] for r in last], ref_loss=ref["loss"],
                      step0=[r["step0"] for r in last],
                      aux_in_eval=max(r["aux_in_eval"] for r in everyone),
                      params=[(r["planned"], r["real"]) for r in everyone],
                      imbalance=[r["imbalance"] for r in everyone],
                      ref_imbalance=ref["imbalance"],
                      elapsed=max(r["elapsed"] for r in everyone))
        if dist.get_rank() == 0:
            print("RESULT " + json.dumps(merged), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

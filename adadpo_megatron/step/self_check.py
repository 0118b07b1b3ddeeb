"""Start-up self-check: the chosen attention and log-prob paths against plain references.

The fast paths (Transformer Engine's THD attention, FlexAttention, megatron-core's fused
softmax, the fused log-prob kernel) run on GPUs that CI does not have, and a wrong result
there is silent: the loss still goes down. So before step 1 every rank runs a small probe
pack through the paths its model will use, on its own device and in the model's dtype, and
compares them with plain fp32 references computed from the same (rounded) inputs:

* attention: the core attention module of the first and the last layer of each model
  chunk (the layer number enters the softmax scale under ``apply_query_key_layer_scaling``)
  against dense ``softmax(q k^T * scale + mask) v``, with the mask from the layout rule of
  ``step/attention.py``. The probe pack (3 pairs, 64 tokens) is prefix-shared when the
  model's attention is prefix-sharing (``--prefix-attention``), plain (block-diagonal
  causal; TE THD under ``PackedSeqParams``) otherwise. Outputs and the gradients of query,
  key and value (for an arbitrary output gradient) are compared.
* log-probs (``--logprob-impl fused``): :func:`fused_vocab_parallel_logprobs` against
  ``vocab_parallel_logprobs`` of the explicit logits (``logprobs.py``, the chunked
  reference), values and the gradients of hidden states and weight, with small tiles so
  several token and vocabulary blocks are crossed. Runs the TP collectives of both paths.

Tolerance (:func:`tolerance`): the error of a few bf16 roundings of O(1) values, 3e-2 of the
reference's largest magnitude (2e-4 in fp32); a mask that lets pairs see each other, a wrong
scale or a dropped block moves the outputs by O(0.1-1) of that magnitude. A mismatch raises
:class:`SelfCheckError`, one line naming the path and the flag that chooses another. Cost:
two attention calls per chunk and one log-prob call on a 64-token pack: milliseconds on a
GPU (measured in ``tests/unit/test_self_check.py`` on the CPU: well under a second).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["SelfCheckError", "check_attention", "check_logprobs", "check_paths", "probe_pack",
           "tolerance"]

# chosen/rejected lengths per pair and the shared prefix of each rejected segment.
_PROBE = ((13, 9, 4), (8, 11, 0), (14, 9, 6))


class SelfCheckError(RuntimeError):
    """A fast path disagrees with its reference on the probe pack (the run must not start)."""


def tolerance(dtype: torch.dtype) -> float:
    """Allowed max error relative to the reference's largest magnitude (module doc)."""
    return 3e-2 if dtype in (torch.bfloat16, torch.float16) else 2e-4


def probe_pack(shared: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The probe pack: ``cu_seqlens`` int32 ``[7]`` and ``shared_prefix_len`` ``[6]`` (or None).

    Pair lengths (chosen, rejected) 13/9, 8/11, 14/9 (64 tokens); shared prefixes 4, 0, 6.
    """
    lens, prefix = [], []
    for chosen, rejected, s in _PROBE:
        lens += [chosen, rejected]
        prefix += [0, s]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return cu, (torch.tensor(prefix) if shared else None)


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module") and isinstance(chunk.module, torch.nn.Module):
        chunk = chunk.module  # DDP, Float16Module
    return chunk


def _core_attentions(chunks: Sequence[torch.nn.Module]) -> list[torch.nn.Module]:
    """First and last layer's core attention of each chunk (each module once)."""
    out: list[torch.nn.Module] = []
    for chunk in chunks:
        layers = [m.core_attention for m in _unwrap(chunk).modules()
                  if isinstance(getattr(m, "core_attention", None), torch.nn.Module)]
        for m in layers[:1] + layers[-1:]:
            if all(m is not o for o in out):
                out.append(m)
    return out


def _compare(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> str | None:
    scale = float(want.abs().max().clamp(min=1e-6))
    err = float((got.float() - want).abs().max()) / scale
    if not math.isfinite(err) or err > tol:
        return f"{name} differs by {err:.2g} of its magnitude (allowed {tol:g})"
    return None


def _reference_attention(q, k, v, cu, shared, scale: float) -> torch.Tensor:
    """fp32 dense attention with the layout rule: q ``[T, np, d]``, k/v ``[T, ng, d]``."""
    from adadpo_megatron.step.attention import _allowed, token_pair_branch

    pair, branch = (x.to(q.device) for x in token_pair_branch(cu, shared))
    pos = torch.arange(q.shape[0], device=q.device)
    allowed = _allowed(pair, branch, pos[:, None], pos[None, :])
    rep = q.shape[1] // k.shape[1]
    qf, kf, vf = q.float(), k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(
        rep, 1)
    scores = torch.einsum("qhd,khd->hqk", qf, kf) * scale
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, vf)


def _effective_scale(config) -> float:
    """The scale every path must apply: ``config.softmax_scale`` or 1/sqrt(kv_channels), as
    megatron-core's SelfAttention hands it to the core attention; layer scaling cancels."""
    given = getattr(config, "softmax_scale", None)
    return float(given) if given is not None else 1.0 / math.sqrt(config.kv_channels)


def _run_attention(module, q, k, v, cu, shared, use_thd: bool):
    """The module on the probe, called as megatron's SelfAttention calls it; ``[T, np*d]``."""
    from adadpo_megatron.step.attention import build_shared_layout

    impl = getattr(module, "impl", None)
    t = q.shape[0]
    if impl is not None:  # ours (mask / flex / te): the layout as attention_mask
        layout = build_shared_layout(cu, shared, q.device, impl)
        mask = layout.dense_mask if impl == "mask" else layout
        return module(q[:, None], k[:, None], v[:, None], mask).reshape(t, -1)
    if not use_thd:  # a plain pack's block-diagonal causal mask (step/batch.py)
        from adadpo_megatron.step.batch import block_causal_mask

        mask = block_causal_mask(cu, q.device)
        return module(q[:, None], k[:, None], v[:, None], mask).reshape(t, -1)
    from adadpo_megatron.step.batch import _packed_seq_params

    lens = cu[1:] - cu[:-1]
    params = _packed_seq_params(cu, int(lens.max()), q.device)
    return module(q, k, v, None, attn_mask_type=None, packed_seq_params=params).reshape(t, -1)


def check_attention(chunks: Sequence[torch.nn.Module], *, use_thd: bool,
                    flag_hint: str = "--prefix-attention mask") -> None:
    """Probe every distinct first/last core attention of ``chunks`` (module doc).

    Raises :class:`SelfCheckError` naming the module and ``flag_hint`` on a mismatch.
    """
    from megatron.core import parallel_state as ps

    from adadpo_megatron.step.forward_step import _model_config

    modules = _core_attentions(chunks)
    if not modules:
        return
    config = _model_config(chunks[0])
    if config.context_parallel_size > 1:
        return  # CP attention exchanges keys/values across ranks: not a local probe
    tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    heads, groups = config.num_attention_heads // tp, config.num_query_groups // tp
    head_dim = config.kv_channels
    dtype = config.params_dtype if config.params_dtype is not None else torch.float32
    shared_layout = getattr(getattr(config, "adadpo_gpt_options", None), "prefix_attention",
                            None) is not None
    cu, shared = probe_pack(shared_layout)
    t = int(cu[-1])
    g = torch.Generator().manual_seed(1234)
    for module in modules:
        device = next((p.device for p in module.parameters()), None) or _device_of(chunks)
        q0 = 2 * torch.randn(t, heads, head_dim, generator=g)  # scores of O(1-4): peaked
        k0 = 2 * torch.randn(t, groups, head_dim, generator=g)
        v0, dout = torch.randn(t, groups, head_dim, generator=g), torch.randn(
            t, heads * head_dim, generator=g)
        q, k, v = (x.to(device, dtype).requires_grad_() for x in (q0, k0, v0))
        grads = getattr(module, "impl", None) != "flex" or device.type != "cpu"
        with torch.enable_grad() if grads else torch.no_grad():
            out = _run_attention(module, q, k, v, cu, shared, use_thd)
            if grads:
                out.backward(dout.to(device, out.dtype))
        qr, kr, vr = (x.detach().float().requires_grad_() for x in (q, k, v))
        with torch.enable_grad():
            want = _reference_attention(qr, kr, vr, cu.to(device), shared,
                                        _effective_scale(config)).reshape(t, -1)
            want.backward(dout.to(device).float())
        tol = tolerance(dtype)
        checks = [("output", out.detach(), want.detach())]
        if grads:
            checks += [(f"d{n}", a.grad, b.grad) for n, a, b in
                       (("query", q, qr), ("key", k, kr), ("value", v, vr))]
        for name, got, ref in checks:
            problem = _compare(name, got, ref, tol)
            if problem is not None:
                layer = getattr(module, "layer_number", "?")
                raise SelfCheckError(
                    f"self-check failed: {type(module).__name__} (layer {layer}, {dtype}, "
                    f"{device}) disagrees with plain attention on the probe pack: {problem}; "
                    f"this attention path is wrong on this machine: choose another with "
                    f"{flag_hint}")


def _device_of(chunks) -> torch.device:
    for chunk in chunks:
        for p in chunk.parameters():
            return p.device
    return torch.device("cpu")


def check_logprobs(*, device: torch.device, dtype: torch.dtype, tp_group=None) -> None:
    """Fused log-probs against the chunked reference on random inputs (module doc).

    Every rank of ``tp_group`` must call it (both paths all-reduce over it).
    """
    from adadpo_megatron.fused_logprobs import fused_vocab_parallel_logprobs
    from adadpo_megatron.logprobs import _group_rank_size, vocab_parallel_logprobs

    rank, size = _group_rank_size(tp_group)
    t, hidden, vocab_local = 48, 64, 320
    g = torch.Generator().manual_seed(4321)
    h0 = torch.randn(t, hidden, generator=g)  # the same on every TP rank
    targets = torch.randint(0, vocab_local * size, (t,), generator=g).to(device)
    dout = torch.randn(t, generator=g).to(device)
    w0 = torch.randn(vocab_local * size, hidden, generator=g)[rank * vocab_local:][:vocab_local]
    w0 = w0 / math.sqrt(hidden) * 3  # logits of O(3): a spread-out softmax
    h1, w1 = (x.to(device, dtype).requires_grad_() for x in (h0, w0))
    h2, w2 = (x.to(device, dtype).requires_grad_() for x in (h0, w0))
    with torch.enable_grad():
        got = fused_vocab_parallel_logprobs(h1, w1, targets, tp_group, chunk_tokens=16,
                                            chunk_vocab=128)
        got.backward(dout)
        want = vocab_parallel_logprobs(h2 @ w2.t(), targets, tp_group, chunk_tokens=16)
        want.backward(dout)
    tol = tolerance(dtype)
    for name, a, b in (("log-probs", got.detach(), want.detach()),
                       ("d hidden", h1.grad, h2.grad), ("d weight", w1.grad, w2.grad)):
        problem = _compare(name, a, b.float(), tol)
        if problem is not None:
            raise SelfCheckError(
                f"self-check failed: fused log-probs ({dtype}, {device}) disagree with the "
                f"chunked path on the probe: {problem}; choose --logprob-impl chunked")


def check_paths(chunks: Sequence[torch.nn.Module], *, use_thd: bool, logprob_impl: str,
                flag_hint: str = "--prefix-attention mask") -> dict[str, Any]:
    """Run both checks on this rank's ``chunks``; returns ``{"seconds": ...}``.

    Call on every rank after the model is built and placed, before step 1 (collectives:
    the log-prob check all-reduces over megatron-core's TP group).
    """
    from adadpo_megatron.logprobs import _megatron_group
    from adadpo_megatron.step.forward_step import _model_config

    start = time.perf_counter()
    check_attention(chunks, use_thd=use_thd, flag_hint=flag_hint)
    if logprob_impl == "fused":
        config = _model_config(chunks[0])
        dtype = config.params_dtype if config.params_dtype is not None else torch.float32
        check_logprobs(device=_device_of(chunks), dtype=dtype, tp_group=_megatron_group("tp"))
    return {"seconds": time.perf_counter() - start}

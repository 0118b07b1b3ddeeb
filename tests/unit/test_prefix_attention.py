"""Prefix-shared attention (step/attention.py) and per-token RoPE (step/rotary.py).

The plain reference everywhere is the unshared run: each sequence alone through the same
GPTModel. fp32; differences come from summation order only (observed ~1e-7 relative), so
1e-5 is the bound the issue sets, with room.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from adadpo_megatron.data.prefix_layout import shared_prefix_len
from adadpo_megatron.step.attention import build_shared_layout, token_pair_branch

TOL = 1e-5


def _pack_spec(num_pairs: int, seed: int, min_prompt: int = 1):
    """Random pairs (prompt, two completions) and the shared micro-batch's cu/shared_prefix."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(num_pairs):
        plen = int(torch.randint(min_prompt, 9, (1,), generator=g))
        prompt = torch.randint(1, 100, (plen,), generator=g)
        seqs = [torch.cat([prompt, torch.randint(1, 100, (int(torch.randint(1, 7, (1,),
                generator=g)),), generator=g)]) for _ in range(2)]
        s = shared_prefix_len(seqs[0].numpy(), seqs[1].numpy(), plen, plen)
        pairs.append(dict(plen=plen, seqs=seqs, s=s))
    return pairs


def shared_batch(pairs, seg_multiple: int = 1):
    """Prefix-shared THD micro-batch of ``pairs`` (as PackedPairDataset lays it out)."""
    cols = {k: [] for k in ("tokens", "position_ids", "labels", "loss_mask")}
    lens, spl = [], []
    for p in pairs:
        for k, seq in enumerate(p["seqs"]):
            skip = p["s"] if k == 1 else 0
            n = len(seq) - skip
            length = -(-n // seg_multiple) * seg_multiple
            tok = torch.zeros(length, dtype=torch.long)
            tok[:n] = seq[skip:]
            lab = torch.zeros(length, dtype=torch.long)
            lab[: n - 1] = seq[skip + 1:]
            mask = torch.zeros(length)
            mask[max(p["plen"] - 1 - skip, 0): n - 1] = 1.0
            for key, v in zip(cols, (tok, skip + torch.arange(length), lab, mask), strict=True):
                cols[key].append(v)
            lens.append(length)
            spl.append(skip)
    batch = {k: torch.cat(v) for k, v in cols.items()}
    batch["cu_seqlens"] = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()],
                                       dtype=torch.int32)
    batch["max_seqlen"] = max(lens)
    batch["shared_prefix_len"] = torch.tensor(spl)
    batch["pair_index"] = torch.arange(len(pairs)).repeat_interleave(2)
    batch["is_chosen"] = torch.tensor([True, False] * len(pairs))
    return batch


def _rule(pair, branch):
    t = pair.numel()
    allowed = torch.zeros(t, t, dtype=torch.bool)
    for q in range(t):
        for k in range(q + 1):
            allowed[q, k] = pair[q] == pair[k] and branch[k] in (0, branch[q])
    return allowed


def test_worked_example_mask():
    # Pair 0: chosen [BOS p1 p2 c1 EOS], rejected [p2 r1 r2 EOS] with s = 2.
    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    pair, branch = token_pair_branch(cu, torch.tensor([0, 2]))
    assert branch.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2]
    mask = build_shared_layout(cu, torch.tensor([0, 2]), "cpu", "mask").dense_mask[0, 0]
    # The rejected "p2" (index 5) sees BOS p1 and itself; not p2 c1 EOS of the chosen branch.
    assert (~mask[5]).nonzero().flatten().tolist() == [0, 1, 5]
    assert (~mask[8]).nonzero().flatten().tolist() == [0, 1, 5, 6, 7, 8]
    assert (~mask[4]).nonzero().flatten().tolist() == [0, 1, 2, 3, 4]


def test_mask_matches_the_rule_and_unshared_is_block_diagonal():
    from adadpo_megatron.step.batch import block_causal_mask

    b = shared_batch(_pack_spec(5, seed=1), seg_multiple=2)
    layout = build_shared_layout(b["cu_seqlens"], b["shared_prefix_len"], "cpu", "mask")
    assert torch.equal(~layout.dense_mask[0, 0], _rule(layout.pair, layout.branch))
    plain = build_shared_layout(b["cu_seqlens"], None, "cpu", "mask")
    assert torch.equal(plain.dense_mask, block_causal_mask(b["cu_seqlens"], "cpu"))


def _attend(q, k, v, allowed, scale):
    """Plain softmax attention, q [Tq, H, D], k/v [Tk, H, D], allowed [Tq, Tk]."""
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def test_te_thd_formulation_is_exact():
    # Emulates what TE computes from the layout: per THD sequence, bottom-right causal
    # attention of its queries over the gathered keys; must equal the masked attention.
    b = shared_batch(_pack_spec(6, seed=2), seg_multiple=2)
    te = build_shared_layout(b["cu_seqlens"], b["shared_prefix_len"], "cpu", "te")
    mask = build_shared_layout(b["cu_seqlens"], b["shared_prefix_len"], "cpu", "mask")
    t = int(b["cu_seqlens"][-1])
    q, k, v = (torch.randn(t, 2, 8, dtype=torch.float64) for _ in range(3))
    want = _attend(q, k, v, ~mask.dense_mask[0, 0], 0.3)
    kk, vv = k[te.te_kv_index], v[te.te_kv_index]
    got = torch.empty_like(want)
    for i in range(te.te_cu_q.numel() - 1):
        q0, q1 = int(te.te_cu_q[i]), int(te.te_cu_q[i + 1])
        k0, k1 = int(te.te_cu_kv[i]), int(te.te_cu_kv[i + 1])
        lq, lk = q1 - q0, k1 - k0
        # bottom-right causal: query j sees keys up to j + (lk - lq)
        allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        got[q0:q1] = _attend(q[q0:q1], kk[k0:k1], vv[k0:k1], allowed, 0.3)
    assert torch.allclose(got, want, atol=1e-12)
    assert te.te_max_q == int((b["cu_seqlens"][1:] - b["cu_seqlens"][:-1]).max())


def test_flex_forward_matches_mask_on_cpu():
    pytest.importorskip("torch.nn.attention.flex_attention")
    b = shared_batch(_pack_spec(7, seed=3))
    t = int(b["cu_seqlens"][-1])
    flex = build_shared_layout(b["cu_seqlens"], b["shared_prefix_len"], "cpu", "flex")
    mask = build_shared_layout(b["cu_seqlens"], b["shared_prefix_len"], "cpu", "mask")
    assert flex.flex_len == 128 and t < 128  # padded to a power of two >= 128
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.randn(1, 4, t, 16)
    k, v = torch.randn(1, 2, t, 16), torch.randn(1, 2, t, 16)
    pad = [torch.nn.functional.pad(x, (0, 0, 0, flex.flex_len - t)) for x in (q, k, v)]
    got = flex_attention(*pad, block_mask=flex.block_mask, scale=0.25, enable_gqa=True)
    want = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
        attn_mask=~mask.dense_mask, scale=0.25)
    assert torch.allclose(got[:, :, :t], want, atol=1e-5)


def test_flex_length_buckets():
    from adadpo_megatron.step.attention import flex_length

    assert [flex_length(n) for n in (1, 127, 128, 129, 300, 4096, 4097)] == [
        128, 128, 128, 256, 512, 4096, 8192]
    # A run sees at most log2(seq_length / 128) + 1 lengths: 7 up to 8192 tokens.
    assert len({flex_length(n) for n in range(1, 8193)}) == 7


@pytest.mark.parametrize("layer_number", [1, 3])
def test_attention_paths_agree_under_query_key_layer_scaling(megatron_cpu, layer_number):
    """apply_query_key_layer_scaling leaves the effective softmax scale at 1/sqrt(d): the
    mask path (megatron-core's DotProductAttention), Flex and a plain reference agree at any
    layer (Flex used to divide its scale by the layer number)."""
    from megatron.core.transformer.enums import AttnMaskType

    from adadpo_megatron.step.attention import core_attention_class
    from adadpo_megatron.step.model import build_transformer_config

    config = build_transformer_config(**MODEL, apply_query_key_layer_scaling=True)
    b = shared_batch(_pack_spec(5, seed=12))
    t, cu, s = int(b["cu_seqlens"][-1]), b["cu_seqlens"], b["shared_prefix_len"]
    g = torch.Generator().manual_seed(2)
    q = 3 * torch.randn(t, 1, 4, 8, generator=g)  # peaked scores: a scale error shows
    k, v = 3 * torch.randn(t, 1, 2, 8, generator=g), torch.randn(t, 1, 2, 8, generator=g)
    dense = build_shared_layout(cu, s, "cpu", "mask").dense_mask
    want = F.scaled_dot_product_attention(
        q.permute(1, 2, 0, 3), k.repeat_interleave(2, 2).permute(1, 2, 0, 3),
        v.repeat_interleave(2, 2).permute(1, 2, 0, 3), attn_mask=~dense,
        scale=1 / math.sqrt(8)).permute(2, 0, 1, 3).reshape(t, 1, -1)
    for impl in ("mask", "flex"):
        attn = core_attention_class(impl)(config, layer_number, AttnMaskType.causal, "self")
        mask = dense if impl == "mask" else build_shared_layout(cu, s, "cpu", impl)
        with torch.no_grad():
            got = attn(q, k, v, mask)
        assert torch.allclose(got, want, atol=1e-5), (impl, (got - want).abs().max())


# ----------------------------------------------------------------- the whole model
MODEL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
             ffn_hidden_size=48, normalization="RMSNorm", swiglu=True, add_bias_linear=False,
             untie_embeddings=True)


@pytest.fixture(scope="module")
def megatron_cpu():
    from adadpo_megatron.step.cpu import initialize_model_parallel_cpu

    initialize_model_parallel_cpu(tp=1, pp=1, seed=5)


def _model(position: str, impl: str | None, **overrides):
    from adadpo_megatron.step.cpu import seed_cpu
    from adadpo_megatron.step.model import build_gpt_model, build_transformer_config

    seed_cpu(11)
    config = build_transformer_config(**{**MODEL, **overrides}, position_embedding_type=position)
    config.adadpo_gpt_options = dataclasses.replace(
        config.adadpo_gpt_options, prefix_attention=impl)
    return build_gpt_model(config, 128, 256)


def _segment_logps(model, batch, impl):
    from adadpo_megatron.logprobs import segment_logprob_sums
    from adadpo_megatron.step.batch import prepare_model_inputs

    inputs = prepare_model_inputs(batch, device="cpu", use_thd=False, shared_attention=impl)
    logits = model(inputs.input_ids, inputs.position_ids, inputs.attention_mask, labels=None)
    logp = F.log_softmax(logits[0].float(), -1).gather(-1, inputs.labels[0, :, None])[:, 0]
    sums, _ = segment_logprob_sums(logp, inputs.loss_mask[0], inputs.cu_seqlens)
    return sums


def _alone(model, pairs):
    out = []
    for p in pairs:
        for seq in p["seqs"]:
            logits = model(seq[None], torch.arange(len(seq))[None], None)[0]
            logp = F.log_softmax(logits.float(), -1)[:-1].gather(-1, seq[1:, None])[:, 0]
            out.append(logp[p["plen"] - 1:].sum())
    return torch.stack(out)


@pytest.mark.parametrize("position", ["rope", "learned_absolute"])
def test_shared_pack_equals_each_sequence_alone(megatron_cpu, position):
    # 24 pairs in one long pack: the last pair sits at the end of a ~600-token pack.
    pairs = _pack_spec(24, seed=4)
    model = _model(position, "mask")
    batch = shared_batch(pairs, seg_multiple=2)
    got = _segment_logps(model, batch, "mask")
    want = _alone(model, pairs)
    assert torch.allclose(got, want, rtol=TOL, atol=TOL), (got - want).abs().max()
    # Gradients of a DPO-like pair objective, shared vs alone.
    model.zero_grad()
    (got[0::2] - got[1::2]).sigmoid().log().sum().backward()
    g_shared = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    want = _alone(model, pairs)
    (want[0::2] - want[1::2]).sigmoid().log().sum().backward()
    for n, p in model.named_parameters():
        err = (g_shared[n] - p.grad).abs().max() / p.grad.abs().max().clamp(min=1e-8)
        assert err <= TOL, (n, float(err))
    # A pair alone in its pack.
    one = _segment_logps(model, shared_batch(pairs[-1:]), "mask")
    assert torch.allclose(one, _alone(model, pairs[-1:]), rtol=TOL, atol=TOL)


def test_rope_needs_position_ids_in_the_shared_layout(megatron_cpu):
    # Break the per-token rotary table (angles by place in the pack, megatron's default):
    # the shared layout's rejected tokens then get the wrong distance to the prompt.
    # init std 0.2, not 0.02: at 0.02 the attention scores are so flat that positions barely
    # matter (the broken table moved the rejected sums by 8e-6 relative, under TOL); at 0.2
    # they are position-sensitive: broken 9e-2 relative (~8600x TOL), correct 1.2e-7.
    from adadpo_megatron.step import rotary

    pairs = _pack_spec(4, seed=6, min_prompt=4)
    model = _model("rope", "mask", init_method_std=0.2)
    batch = shared_batch(pairs)
    with torch.no_grad():
        want = _alone(model, pairs)
        good = _segment_logps(model, batch, "mask")
        original = rotary.per_token_rotary
        try:
            rotary.per_token_rotary = lambda freqs, position_ids: freqs
            bad = _segment_logps(model, batch, "mask")
        finally:
            rotary.per_token_rotary = original

    def rel(x):
        return float(((x - want) / want.abs().clamp(min=1)).abs().max())

    assert rel(good) <= TOL
    assert float(((bad - want) / want.abs().clamp(min=1))[1::2].abs().max()) > 100 * TOL
    assert torch.allclose(bad[0::2], want[0::2], rtol=TOL, atol=TOL)  # chosen: contiguous


def test_flex_model_forward_matches_mask(megatron_cpu):
    pairs = _pack_spec(6, seed=8)
    batch = shared_batch(pairs)
    with torch.no_grad():  # FlexAttention has no CPU backward in PyTorch
        got = _segment_logps(_model("rope", "flex"), batch, "flex")
        want = _segment_logps(_model("rope", "mask"), batch, "mask")
    assert torch.allclose(got, want, rtol=TOL, atol=TOL)


def test_shared_batch_refused_without_the_attention_and_with_cp():
    from adadpo_megatron.step.batch import prepare_model_inputs

    batch = shared_batch(_pack_spec(2, seed=9, min_prompt=3))
    with pytest.raises(ValueError, match="built without prefix-sharing attention"):
        prepare_model_inputs(batch, device="cpu", use_thd=False)
    with pytest.raises(ValueError, match="context parallel size 2"):
        prepare_model_inputs(batch, device="cpu", use_thd=True, cp_size=2,
                             shared_attention="mask")
    assert math.isfinite(float(batch["loss_mask"].sum()))


def test_prefix_attention_keeps_parameters_and_checkpoint_keys(megatron_cpu):
    # Only the core attention changes: same parameters, same state-dict keys, so a
    # checkpoint of either model loads into the other (e.g. an SFT checkpoint as reference).
    plain, shared = _model("rope", None), _model("rope", "mask")
    assert list(dict(plain.named_parameters())) == list(dict(shared.named_parameters()))
    assert plain.state_dict().keys() == shared.state_dict().keys()
    shared.load_state_dict(plain.state_dict())
    layer = shared.decoder.layers[0].self_attention
    assert type(layer.core_attention).__name__ == "MaskSharedAttention"
    assert type(layer.linear_qkv) is type(plain.decoder.layers[0].self_attention.linear_qkv)
    assert plain.sharded_state_dict().keys() == shared.sharded_state_dict().keys()

"""Prefix sharing vs the separate layout, and packing vs one pair per pack, on the same pairs.

Two length sets (token counts, BOS/EOS included):

* ``ultrafeedback``: prompt ~ LogNormal(ln 190, 0.3) clipped to [120, 300]; each completion
  ~ LogNormal(ln 260, 0.8) clipped to [4, 2048] (UltraFeedback-like).
* ``long-prompt``: the same, but 15% of the prompts ~ LogNormal(ln 3000, 0.1) clipped to
  [2000, 4000] (retrieval context, long system prompts).

Part 1, **tokens and packs** (``--pairs`` pairs, full lengths, packs of ``--pack-size``,
FFD; the default 16,384 holds every pair of both sets unshared): tokens per pair (separate ``2P+C+R`` vs shared ``P+C+R``) and the packs each layout
needs, packed or one pair per pack (``--max-pairs-per-pack 1``).

Part 2, **measured step time**: a small GPT (megatron-core ``GPTModel``, local spec, fp32,
RoPE, TP=1) runs forward + backward of the DPO loss over the same ``--step-pairs`` pairs in
four layouts: separate/shared x packed/one pair per pack. Each pack is one micro-batch, as
``adadpo-train`` runs it: ``prepare_model_inputs`` -> ``GPTModel`` -> vocab-parallel
log-probs -> segment sums -> loss -> backward (the separate layout through megatron-core's
own attention with a block-diagonal mask, the shared one through the prefix-sharing mask
attention). On a CPU the lengths are scaled by ``--scale`` (default 0.1: a 3,000-token prompt
becomes 300) so that the dense ``[T, T]`` attention of the CPU path fits; the pack size is
scaled alike. Every variant is timed ``--repeats`` times, interleaved; the best is kept.

Usage:
    python benchmarks/bench_prefix_sharing.py                 # both sets, CPU, scaled 0.1
    python benchmarks/bench_prefix_sharing.py --json          # machine-readable
    python benchmarks/bench_prefix_sharing.py --set long-prompt --step-pairs 64 --repeats 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

SETS = ("ultrafeedback", "long-prompt")


def lengths(name: str, n: int, seed: int, scale: float = 1.0) -> tuple[np.ndarray, ...]:
    """(prompt, chosen, rejected) int64 [n] token counts of length set ``name``."""
    rng = np.random.default_rng(seed)
    prompt = np.clip(rng.lognormal(np.log(190), 0.3, n), 120, 300)
    if name == "long-prompt":
        long = rng.random(n) < 0.15
        prompt[long] = np.clip(rng.lognormal(np.log(3000), 0.1, int(long.sum())), 2000, 4000)
    comp = np.clip(rng.lognormal(np.log(260), 0.8, (2, n)), 4, 2048)
    out = [np.maximum(np.round(x * scale), 2).astype(np.int64) for x in (prompt, *comp)]
    return out[0], out[1], out[2]


def token_counts(name: str, n: int, pack_size: int, seed: int) -> dict:
    """Part 1: tokens per pair and packs, separate vs shared, packed vs one pair per pack."""
    from adadpo_megatron.packing import pack_pairs

    p, c, r = lengths(name, n, seed)
    plain = (p + c, p + r)
    shared = (p + c, r + 1)  # the rejected branch keeps the last prompt token (s = P - 1)
    out = {"pairs": n, "pack_size": pack_size}
    for label, (a, b) in (("separate", plain), ("shared", shared)):
        fits = (a + b) <= pack_size
        plan = pack_pairs(a[fits], b[fits], pack_size)
        out[label] = {
            "tokens_per_pair": float((a + b).mean()),
            "packs": plan.num_packs,
            "packs_one_pair_each": int(fits.sum()),
            "pairs_that_fit": int(fits.sum()),
        }
    out["token_ratio"] = out["separate"]["tokens_per_pair"] / out["shared"]["tokens_per_pair"]
    return out


@dataclasses.dataclass
class _Pair:
    seqs: list[np.ndarray]
    prompt_len: int
    shared: int


def _pairs(name: str, n: int, seed: int, scale: float, vocab: int) -> list[_Pair]:
    p, c, r = lengths(name, n, seed, scale)
    rng = np.random.default_rng(seed + 1)
    out = []
    for i in range(n):
        prompt = rng.integers(3, vocab, int(p[i]))
        seqs = [np.concatenate([prompt, rng.integers(3, vocab, int(k))]) for k in (c[i], r[i])]
        out.append(_Pair(seqs=seqs, prompt_len=int(p[i]), shared=int(p[i]) - 1))
    return out


def _micro_batches(pairs: list[_Pair], shared: bool, capacity: int | None) -> list[dict]:
    """Packs (FFD into ``capacity``; None: one pair per pack) as THD micro-batch dicts."""
    from adadpo_megatron.data.prefix_layout import build_pack
    from adadpo_megatron.packing import pack_pairs

    skips = [(0, q.shared if shared else 0) for q in pairs]
    a = np.array([len(q.seqs[0]) for q in pairs])
    b = np.array([len(q.seqs[1]) - s[1] for q, s in zip(pairs, skips, strict=True)])
    if capacity is None:
        groups = [[i] for i in range(len(pairs))]
    else:
        plan = pack_pairs(a, b, capacity)
        groups = [plan.pairs_in_pack(k).tolist() for k in range(plan.num_packs)]
    out = []
    for g in groups:
        seqs = [s for i in g for s in pairs[i].seqs]
        out.append(build_pack(
            seqs, [pairs[i].prompt_len for i in g for _ in range(2)], g,
            skips=[x for i in g for x in skips[i]] if shared else None))
    return out


def _model(shared: bool, vocab: int, max_len: int, args):
    from adadpo_megatron.step.cpu import seed_cpu
    from adadpo_megatron.step.model import build_gpt_model, build_transformer_config

    seed_cpu(7)
    config = build_transformer_config(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        ffn_hidden_size=4 * args.hidden, normalization="RMSNorm", swiglu=True,
        position_embedding_type="rope", add_bias_linear=False, untie_embeddings=True)
    if shared:
        config.adadpo_gpt_options = dataclasses.replace(
            config.adadpo_gpt_options, prefix_attention="mask")
    return build_gpt_model(config, vocab, max_len)


def _step(model, mbs: list[dict], shared: bool) -> float:
    """Forward + backward of the DPO loss over ``mbs``; returns the summed loss."""
    import torch.nn.functional as F

    from adadpo_megatron.logprobs import segment_logprob_sums, vocab_parallel_logprobs
    from adadpo_megatron.step.batch import prepare_model_inputs

    total = 0.0
    for mb in mbs:
        inputs = prepare_model_inputs(mb, device="cpu", use_thd=False,
                                      shared_attention="mask" if shared else None)
        logits = model(inputs.input_ids, inputs.position_ids, inputs.attention_mask, labels=None)
        logps = vocab_parallel_logprobs(logits, inputs.labels, None)
        sums, _ = segment_logprob_sums(logps.reshape(-1), inputs.loss_mask.reshape(-1),
                                       inputs.cu_seqlens)
        loss = -F.logsigmoid(0.1 * (sums[0::2] - sums[1::2])).sum()
        loss.backward()
        total += float(loss.detach())
    return total


def step_times(name: str, args) -> dict:
    """Part 2: measured forward+backward time of one step over the same pairs, 4 layouts."""
    from adadpo_megatron.step.cpu import initialize_model_parallel_cpu

    initialize_model_parallel_cpu(tp=1, pp=1, seed=7)
    vocab = 1024
    pairs = _pairs(name, args.step_pairs, args.seed, args.scale, vocab)
    capacity = int(args.pack_size * args.scale)
    longest = max(len(q.seqs[0]) + len(q.seqs[1]) for q in pairs)
    capacity = max(capacity, longest)
    variants = {
        "separate_packed": (False, capacity),
        "shared_packed": (True, capacity),
        "separate_one_pair_per_pack": (False, None),
        "shared_one_pair_per_pack": (True, None),
    }
    models = {s: _model(s, vocab, capacity, args) for s in (False, True)}
    batches = {k: _micro_batches(pairs, s, c) for k, (s, c) in variants.items()}
    times: dict[str, list[float]] = {k: [] for k in variants}
    losses = {}
    for _ in range(args.repeats):
        for k, (s, _c) in variants.items():
            models[s].zero_grad()
            t0 = time.perf_counter()
            losses[k] = _step(models[s], batches[k], s)
            times[k].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    ref = losses["separate_one_pair_per_pack"]
    return {
        "pairs": args.step_pairs,
        "scale": args.scale,
        "pack_capacity": capacity,
        "tokens": {k: int(sum(int(m["cu_seqlens"][-1]) for m in b)) for k, b in batches.items()},
        "micro_batches": {k: len(b) for k, b in batches.items()},
        "best_s": best,
        "loss_rel_diff_vs_separate_one_pair": max(abs(v - ref) / abs(ref) for v in losses.values()),
        "speedup_shared_vs_separate_packed": best["separate_packed"] / best["shared_packed"],
        "speedup_packed_vs_one_pair_separate": (
            best["separate_one_pair_per_pack"] / best["separate_packed"]),
        "speedup_shared_packed_vs_separate_one_pair": (
            best["separate_one_pair_per_pack"] / best["shared_packed"]),
    }


def main(argv=None) -> int:
    """Runs the benchmark; prints a table (or JSON with ``--json``). Returns 0."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", choices=(*SETS, "both"), default="both")
    ap.add_argument("--pairs", type=int, default=100_000, help="pairs for token/pack counts")
    ap.add_argument("--pack-size", type=int, default=16384,
                    help="pack size (full lengths; 16,384 holds every long-prompt pair unshared)")
    ap.add_argument("--step-pairs", type=int, default=32, help="pairs in the timed step")
    ap.add_argument("--scale", type=float, default=0.1, help="length scale of the timed step")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    results = {}
    for name in SETS if args.set == "both" else (args.set,):
        results[name] = {"counts": token_counts(name, args.pairs, args.pack_size, args.seed),
                         "step": step_times(name, args)}
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    for name, res in results.items():
        c, s = res["counts"], res["step"]
        print(f"== {name}: {c['pairs']} pairs, packs of {c['pack_size']} tokens")
        for lay in ("separate", "shared"):
            d = c[lay]
            print(f"  {lay:9s} tokens/pair {d['tokens_per_pair']:8.1f}  packs {d['packs']:7d}  "
                  f"one pair per pack {d['packs_one_pair_each']:7d}")
        print(f"  tokens: {c['token_ratio']:.2f}x fewer with sharing")
        print(f"  step over {s['pairs']} pairs (lengths x{s['scale']}, packs of "
              f"{s['pack_capacity']}), best of {args.repeats}:")
        for k, t in s["best_s"].items():
            print(f"    {k:28s} {t:7.3f} s  {s['micro_batches'][k]:3d} micro-batches  "
                  f"{s['tokens'][k]:6d} tokens")
        print(f"  shared vs separate (packed): {s['speedup_shared_vs_separate_packed']:.2f}x; "
              f"packed vs one pair per pack (separate): "
              f"{s['speedup_packed_vs_one_pair_separate']:.2f}x; shared packed vs separate one "
              f"pair per pack: {s['speedup_shared_packed_vs_separate_one_pair']:.2f}x; "
              f"loss max rel. diff {s['loss_rel_diff_vs_separate_one_pair']:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Check that the bundled preference set is learnable by a tiny GPT in about a minute of CPU.

Independent of the Megatron trainer: a plain-torch causal LM (random init), its frozen
initial copy as the reference, trained by DPO or AdaDPO (LOSSES.md: token granularity,
policy space, clip C = 2, mode upper) on ``examples/data/train.jsonl``, with the held-out
reward accuracy (fraction of ``eval.jsonl`` pairs with ``rho_w > rho_l``) printed as
it trains. The quickstart's target is accuracy > 0.8.

Usage::

    python tools/check_example_data.py --loss adadpo   # or --loss dpo
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DATA_DIR = Path(__file__).resolve().parent.parent / "examples" / "data"


class TinyGPT(nn.Module):
    """Pre-norm causal transformer: token + learned position embeddings, tied-free LM head."""

    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, max_len: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(max_len, hidden)
        block = nn.TransformerEncoderLayer(
            hidden, heads, 4 * hidden, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens int64 [B, T] -> logits float32 [B, T, V]."""
        t = tokens.shape[1]
        x = self.tok(tokens) + self.pos(torch.arange(t, device=tokens.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device)
        return self.head(self.norm(self.blocks(x, mask=mask, is_causal=True)))


def encode_pairs(path: Path, sp) -> list[tuple[list[int], list[int], list[int]]]:
    """JSONL pairs -> (BOS + prompt ids, chosen completion ids + EOS, rejected ones + EOS).

    As the pack tool does, ``prompt + completion`` is tokenized as one string and the
    prompt part is the prefix that agrees with the prompt's own tokenization.
    """
    out = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            prompt = sp.encode(row["prompt"])
            sides = []
            for key in ("chosen", "rejected"):
                ids = sp.encode(row["prompt"] + row[key])
                n = 0
                while n < min(len(prompt), len(ids)) and ids[n] == prompt[n]:
                    n += 1
                sides.append((ids[:n], ids[n:] + [sp.eos_id()]))
            n = min(len(sides[0][0]), len(sides[1][0]))
            # Both sides share the prompt prefix; a merged boundary token counts as completion.
            out.append(
                (
                    [sp.bos_id()] + sides[0][0][:n],
                    sides[0][0][n:] + sides[0][1],
                    sides[1][0][n:] + sides[1][1],
                )
            )
    return out


def make_batch(pairs: list[tuple[list[int], list[int], list[int]]]) -> tuple[torch.Tensor, ...]:
    """Pairs -> tokens [2B, T], labels [2B, T], loss_mask [2B, T]; rows 2i chosen, 2i+1 rejected."""
    seqs, prompt_lens = [], []
    for prompt, chosen, rejected in pairs:
        seqs += [prompt + chosen, prompt + rejected]
        prompt_lens += [len(prompt), len(prompt)]
    t = max(len(s) for s in seqs)
    tokens = torch.zeros(len(seqs), t, dtype=torch.long)
    mask = torch.zeros(len(seqs), t)
    for i, (s, p) in enumerate(zip(seqs, prompt_lens, strict=True)):
        tokens[i, : len(s)] = torch.tensor(s)
        mask[i, p - 1 : len(s) - 1] = 1.0  # position j predicts token j+1: completion tokens only
    labels = torch.roll(tokens, -1, dims=1)
    return tokens, labels, mask


def sequence_logps(model: nn.Module, tokens, labels, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs [2B] and completion lengths [2B]."""
    logp = (
        torch.log_softmax(model(tokens).float(), dim=-1)
        .gather(-1, labels.unsqueeze(-1))
        .squeeze(-1)
    )
    return (logp * mask).sum(-1), mask.sum(-1)


def preference_loss(loss: str, beta: float, pol, ref, lens) -> torch.Tensor:
    """Mean DPO or AdaDPO loss over pairs; inputs are [2B] with chosen at even rows."""
    pol_w, pol_l, ref_w, ref_l = pol[0::2], pol[1::2], ref[0::2], ref[1::2]
    rho_w, rho_l = pol_w - ref_w, pol_l - ref_l
    if loss == "adadpo":
        s = (pol_w / lens[0::2] - pol_l / lens[1::2]).detach()
        k = torch.exp(torch.clamp(s, max=math.log(2.0)))
        rho_w = k * rho_w
    return -F.logsigmoid(beta * (rho_w - rho_l)).mean()


@torch.no_grad()
def logps_of(model, pairs, batch_size: int) -> torch.Tensor:
    """Summed completion log-probs of every sequence of ``pairs`` (chosen, rejected interleaved)."""
    model.eval()
    out = [
        sequence_logps(model, *make_batch(pairs[i : i + batch_size]))[0]
        for i in range(0, len(pairs), batch_size)
    ]
    model.train()
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    """Train for ``--steps`` (or ``--seconds``), printing held-out reward accuracy; 0 if > --target."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, default=DATA_DIR)
    p.add_argument("--loss", choices=["dpo", "adadpo"], default="adadpo")
    p.add_argument(
        "--seconds", type=float, default=math.inf, help="stop after this much training time"
    )
    p.add_argument("--steps", type=int, default=100, help="stop after this many steps")
    p.add_argument("--eval-every", type=int, default=25, help="evaluate every N steps")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-pairs", type=int, default=16)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=0.8)
    args = p.parse_args(argv)
    import sentencepiece as spm

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    sp = spm.SentencePieceProcessor(model_file=str(args.data / "tokenizer.model"))
    train = encode_pairs(args.data / "train.jsonl", sp)
    held_out = encode_pairs(args.data / "eval.jsonl", sp)
    max_len = max(len(a) + max(len(b), len(c)) for a, b, c in train + held_out)
    model = TinyGPT(sp.vocab_size(), args.hidden, args.layers, args.heads, max_len)
    # The reference is the initial model, so its log-probs are computed once.
    ref_train = logps_of(model, train, 64)
    ref_eval = logps_of(model, held_out, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    start, step = time.perf_counter(), 0
    while True:
        elapsed = time.perf_counter() - start
        done = elapsed >= args.seconds or step >= args.steps
        if done or step % args.eval_every == 0:
            pol = logps_of(model, held_out, 64)
            h = (pol - ref_eval)[0::2] - (pol - ref_eval)[1::2]
            acc = (h > 0).float().mean().item()
            print(
                f"t={elapsed:5.1f}s step={step:4d} eval reward accuracy={acc:.3f} "
                f"margin={args.beta * h.mean().item():.3f}",
                flush=True,
            )
        if done:
            break
        idx = torch.randint(len(train), (args.batch_pairs,), generator=gen).tolist()
        tokens, labels, mask = make_batch([train[i] for i in idx])
        pol, lens = sequence_logps(model, tokens, labels, mask)
        ref = torch.stack([ref_train[2 * i + j] for i in idx for j in (0, 1)])
        loss = preference_loss(args.loss, args.beta, pol, ref, lens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    print(
        f"{args.loss}: held-out reward accuracy {acc:.3f} after {step} steps ({elapsed:.0f} s of training)"
    )
    return 0 if acc > args.target else 1


if __name__ == "__main__":
    raise SystemExit(main())

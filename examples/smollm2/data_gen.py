"""Preference pairs from the base model's own answers (on-policy negatives).

For each question the base model samples ``k`` replies at temperature 1. ``rejected`` is
its first wrong reply that ends (an end-of-turn before the token limit) and contains a
number; ``chosen`` is its first correct reply if it gave one (fully on-policy), else the
worked form the model itself often uses, ``"23 + 5 = 28"``. Questions with no usable wrong reply are left out (the model always got them
right). Rows are written in the conversational form adadpo-pack reads, so the model's own
chat template renders them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from task import Question, chat, is_correct, last_integer

__all__ = ["make_pairs", "write_jsonl"]


def make_pairs(questions: list[Question], samples: list[list[tuple[str, bool]]]
               ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Pairs (conversational rows) from sampled replies; and counts of how they were made.

    ``samples[i]`` are the (reply, finished) samples for ``questions[i]``.
    """
    rows: list[dict[str, Any]] = []
    counts = {"questions": len(questions), "pairs": 0, "chosen_sampled": 0,
              "chosen_written": 0, "no_wrong_reply": 0}
    for q, replies in zip(questions, samples, strict=True):
        wrong = [r for r, done in replies
                 if done and r and last_integer(r) is not None and not is_correct(q, r)]
        right = [r for r, done in replies if done and r and is_correct(q, r)]
        if not wrong:
            counts["no_wrong_reply"] += 1
            continue
        chosen = right[0] if right else f"{q.a} + {q.b} = {q.answer}"
        counts["chosen_sampled" if right else "chosen_written"] += 1
        assert is_correct(q, chosen) and chosen != wrong[0]
        rows.append({"prompt": chat(q), "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": wrong[0]}],
                     "question": q.text, "answer": q.answer})
        counts["pairs"] += 1
    return rows, counts


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """One JSON object per line (UTF-8)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

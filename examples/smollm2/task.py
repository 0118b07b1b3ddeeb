"""The seeded arithmetic task of the SmolLM2 example: questions, and a program that checks answers.

A question is an addition ``a + b`` (``2 <= a <= 60``, ``2 <= b <= 9``) asked as one user
turn, ``"What is 23 + 5? Answer with only the number."``, under the model's default system
prompt (the chat template adds it). The answer checker takes the *last* integer in the
model's reply (SmolLM2 often echoes the sum: ``"23 + 5 = 28"``), ignoring thousands
separators; a reply cut off by the token budget is judged as it stands. Measured on 32
questions before settling on this form: greedy accuracy of the base model 41% with one-digit
``a``, 19% with ``10 <= a <= 49``, 0% with a "number only" system prompt (it then always says
"To add ..."), so the held-out accuracy lands inside 10-70%.

Train and held-out questions are drawn from one seeded stream without replacement, so a
held-out question is never trained on (checked by :func:`make_splits`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

__all__ = ["Question", "chat", "is_correct", "last_integer", "make_splits"]

_INT = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Question:
    """One arithmetic question: ``a + b``; ``answer`` is the exact result."""

    a: int
    b: int

    @property
    def text(self) -> str:
        """The user turn, e.g. ``"What is 23 + 5? Answer with only the number."``."""
        return f"What is {self.a} + {self.b}? Answer with only the number."

    @property
    def answer(self) -> int:
        """The correct result."""
        return self.a + self.b


def chat(q: Question) -> list[dict[str, str]]:
    """The prompt as chat messages (one user turn), for the tokenizer's chat template."""
    return [{"role": "user", "content": q.text}]


def last_integer(reply: str) -> int | None:
    """The last integer in ``reply`` (commas between digits removed), or None if there is none."""
    found = _INT.findall(re.sub(r"(?<=\d),(?=\d{3})", "", reply))
    return int(found[-1]) if found else None


def is_correct(q: Question, reply: str) -> bool:
    """True when the reply's last integer is the question's answer."""
    return last_integer(reply) == q.answer


A_RANGE = (2, 60)
B_RANGE = (2, 9)


def make_splits(seed: int, n_train: int, n_heldout: int) -> tuple[list[Question], list[Question]]:
    """Distinct questions ``a + b`` (:data:`A_RANGE`, :data:`B_RANGE`): (train, held-out), disjoint.

    Deterministic in ``seed``. Raises ValueError when more questions are asked for than exist.
    """
    na, nb = A_RANGE[1] - A_RANGE[0] + 1, B_RANGE[1] - B_RANGE[0] + 1
    if n_train + n_heldout > na * nb:
        raise ValueError(f"{n_train} + {n_heldout} questions asked for; only {na * nb} exist")
    rng = random.Random(seed)
    picked = rng.sample(range(na * nb), n_train + n_heldout)
    qs = [Question(A_RANGE[0] + k // nb, B_RANGE[0] + k % nb) for k in picked]
    train, heldout = qs[:n_train], qs[n_train:]
    assert not set(train) & set(heldout)
    return train, heldout

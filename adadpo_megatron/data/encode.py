"""Turning a validated record into the two token sequences of a pair (BOS/EOS, truncation).

Each sequence is ``[BOS] + prompt + completion + [EOS]``:

* the text ``prompt + completion`` is tokenized as one string, so decoding a sequence gives
  back exactly that text. Its prompt part is the longest prefix of those tokens that agrees
  with the prompt's own tokenization (all of it, unless the tokenizer merges a token across
  the boundary; the merged token then counts as completion). Prompt tokens are never scored
  (loss mask 0); completion tokens and the EOS are;
* BOS (``--no-bos`` to drop) is added unless the text already starts with it (a template
  that renders ``bos_token``); EOS (``--no-eos``) is added unless the completion already
  ends with it. A tokenizer without a BOS/EOS id needs ``--bos-token``/``--eos-token`` or
  ``--no-bos``/``--no-eos``.

Truncation, only with ``--max-seq-len L`` (per sequence, BOS/EOS included):

1. the prompt loses tokens from the left (after the BOS), as many as the longer sequence
   needs to fit, but keeps at least ``--min-prompt-tokens`` (default ``L // 2``) of them;
2. each sequence still over ``L`` is cut from the right: its EOS goes first, then
   completion tokens;
3. a pair with no completion token left is rejected (``prompt_too_long``).

A pair whose footprint (both sequences rounded up to ``--align``) exceeds ``--pack-size`` is
rejected (``exceeds_pack_size``), as is one whose two sequences end up identical
(``identical_tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adadpo_megatron.data.chat_template import ChatTemplate
from adadpo_megatron.data.records import PreferenceRecord, RecordRejected
from adadpo_megatron.data.tokenizer import Tokenizer

__all__ = ["EncodeConfig", "EncodedPair", "NoChatTemplateError", "PairEncoder"]


class NoChatTemplateError(ValueError):
    """A conversational line met a run without a chat template (a setup error, not a reject)."""


@dataclass(frozen=True, kw_only=True)
class EncodeConfig:
    """How records become sequences; the pack tool's flags of the same names."""

    capacity: int
    """Token slots per pack (``--pack-size``); a pair's footprint must not exceed it."""
    add_bos: bool = True
    """Prepend the tokenizer's BOS to each sequence (``--no-bos`` turns it off)."""
    add_eos: bool = True
    """Append the tokenizer's EOS after each completion (``--no-eos`` turns it off)."""
    max_seq_len: int | None = None
    """Per-sequence token limit (``--max-seq-len``), BOS/EOS included; None: no truncation."""
    min_prompt_tokens: int | None = None
    """Prompt tokens truncation always keeps (``--min-prompt-tokens``); None: max_seq_len // 2."""
    align: int = 1
    """Each sequence counts rounded up to a multiple of this against ``capacity``."""

    def __post_init__(self) -> None:
        for name, flag in (("capacity", "--pack-size"), ("align", "--align")):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag} must be >= 1, got {getattr(self, name)}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ValueError(f"--max-seq-len must be >= 2, got {self.max_seq_len}")
        if self.min_prompt_tokens is not None and self.min_prompt_tokens < 0:
            raise ValueError(f"--min-prompt-tokens must be >= 0, got {self.min_prompt_tokens}")


@dataclass(frozen=True, kw_only=True)
class EncodedPair:
    """The two sequences of one pair, ready to store."""

    chosen: np.ndarray
    """int64 [Lc]: the full chosen sequence (BOS, prompt, completion, EOS)."""
    rejected: np.ndarray
    """int64 [Lr]: the full rejected sequence."""
    chosen_prompt_len: int
    """Leading tokens of ``chosen`` that are not scored (BOS + prompt)."""
    rejected_prompt_len: int
    prompt_truncated: bool
    """True when prompt tokens were dropped from the left."""
    completions_truncated: int
    """How many of the two sequences were cut from the right (0, 1 or 2)."""


def _is_library_error(exc: BaseException) -> bool:
    """True for an exception a tokenizer library raises on bad input: any ``Exception``, or
    the Rust panic of ``tokenizers`` (``PanicException``, a ``BaseException``); never for
    KeyboardInterrupt, SystemExit or MemoryError."""
    return isinstance(exc, Exception) and not isinstance(exc, MemoryError) or (
        type(exc).__name__ == "PanicException"
    )


def _shared_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    k = 0
    while a[k] == b[k]:
        k += 1
    return k


class PairEncoder:
    """Encodes records into :class:`EncodedPair` for one tokenizer, template and config."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate | None, cfg: EncodeConfig):
        for role, wanted, token_id in (
            ("bos", cfg.add_bos, tokenizer.bos_id),
            ("eos", cfg.add_eos, tokenizer.eos_id),
        ):
            if wanted and token_id is None:
                raise ValueError(
                    f"tokenizer {tokenizer.path} has no {role.upper()} token: pass "
                    f"--{role}-token TEXT to name one, or --no-{role}"
                )
        self.tokenizer = tokenizer
        self.template = template
        self.cfg = cfg
        self._bos = tokenizer.bos_id if cfg.add_bos else None
        self._eos = tokenizer.eos_id if cfg.add_eos else None

    def _texts(self, record: PreferenceRecord) -> tuple[str, str, str]:
        if not record.conversational:
            return record.prompt, record.chosen, record.rejected  # type: ignore[return-value]
        if self.template is None:
            raise NoChatTemplateError(
                f"line {record.line} is in the conversational form (message lists) but no chat "
                "template is set and the tokenizer has none: pass --chat-template chatml|llama3|"
                "plain|PATH.jinja"
            )
        prompt_text, chosen_text = self.template.split(record.prompt, record.chosen)  # type: ignore[arg-type]
        _, rejected_text = self.template.split(record.prompt, record.rejected)  # type: ignore[arg-type]
        return prompt_text, chosen_text, rejected_text

    def _sequence(self, prompt_ids: list[int], full: list[int], name: str) -> tuple[list[int], int]:
        """(tokens with BOS/EOS, BOS + prompt length) from the tokens of ``prompt + completion``."""
        k = _shared_len(prompt_ids, full)
        if k == len(full):
            raise RecordRejected("empty_completion", f"the {name} completion tokenizes to nothing")
        head: list[int] = []
        if self._bos is not None and full[0] != self._bos:
            head = [self._bos]
        tail: list[int] = []
        if self._eos is not None and full[-1] != self._eos:
            tail = [self._eos]
        return head + full + tail, len(head) + k

    def encode(self, record: PreferenceRecord) -> EncodedPair:
        """The pair's two sequences, truncated per the config.

        Raises:
            RecordRejected: reasons ``chat_template``, ``empty_completion``,
                ``prompt_too_long``, ``identical_tokens``, ``exceeds_pack_size``.
            NoChatTemplateError: a conversational record and no template.
        """
        result = self.encode_many([record])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def encode_many(
        self, records: list[PreferenceRecord]
    ) -> list[EncodedPair | RecordRejected | NoChatTemplateError]:
        """:meth:`encode` for many records, tokenizing all their texts in one batch call.

        Returns one entry per record, in order: the pair, or the exception :meth:`encode`
        would raise for it (so the caller can report them in line order).
        """
        results: list[EncodedPair | RecordRejected | NoChatTemplateError | None] = [None] * len(
            records
        )
        texts: list[str] = []
        todo: list[int] = []
        for k, record in enumerate(records):
            try:
                prompt, chosen, rejected = self._texts(record)
            except (RecordRejected, NoChatTemplateError) as exc:
                results[k] = exc
                continue
            texts += [prompt, prompt + chosen, prompt + rejected]
            todo.append(k)
        try:
            ids = self.tokenizer.encode_batch(texts) if texts else []
        except BaseException as exc:  # pyo3's PanicException is a BaseException
            if not _is_library_error(exc):
                raise
            ids = None  # one text failed: tokenize record by record to find which
        for n, k in enumerate(todo):
            try:
                triple = ids[3 * n : 3 * n + 3] if ids is not None else self._encode3(texts[3 * n : 3 * n + 3])
                results[k] = self._pair(*triple)
            except RecordRejected as exc:
                results[k] = exc
        return results  # type: ignore[return-value]

    def _encode3(self, texts: list[str]) -> list[list[int]]:
        """Tokenize one record's three texts; a tokenizer failure becomes a reject."""
        try:
            return self.tokenizer.encode_batch(texts)
        except BaseException as exc:
            if not _is_library_error(exc):
                raise
            raise RecordRejected("tokenizer_error", f"{type(exc).__name__}: {exc}") from None

    def _pair(
        self, prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int]
    ) -> EncodedPair:
        seqs = [
            self._sequence(prompt_ids, chosen_ids, "chosen"),
            self._sequence(prompt_ids, rejected_ids, "rejected"),
        ]
        prompt_truncated, cut = False, 0
        if self.cfg.max_seq_len is not None:
            seqs, prompt_truncated, cut = self._truncate(seqs)
        (chosen, chosen_pl), (rejected, rejected_pl) = seqs
        if chosen == rejected:
            raise RecordRejected(
                "identical_tokens",
                "chosen and rejected are the same tokens after truncation"
                if cut
                else "chosen and rejected tokenize to the same tokens",
            )
        align, capacity = self.cfg.align, self.cfg.capacity
        footprint = sum(-(-len(s) // align) * align for s in (chosen, rejected))
        if footprint > capacity:
            raise RecordRejected(
                "exceeds_pack_size",
                f"the pair takes {footprint} tokens ({len(chosen)} + {len(rejected)}"
                f"{f', aligned to {align}' if align > 1 else ''}) > --pack-size {capacity}; "
                "raise --pack-size or set --max-seq-len",
            )
        return EncodedPair(
            chosen=np.asarray(chosen, dtype=np.int64),
            rejected=np.asarray(rejected, dtype=np.int64),
            chosen_prompt_len=chosen_pl,
            rejected_prompt_len=rejected_pl,
            prompt_truncated=prompt_truncated,
            completions_truncated=cut,
        )

    def _truncate(
        self, seqs: list[tuple[list[int], int]]
    ) -> tuple[list[tuple[list[int], int]], bool, int]:
        """Apply the truncation rules of the module docstring to both sequences."""
        limit = self.cfg.max_seq_len
        assert limit is not None
        keep = self.cfg.min_prompt_tokens
        keep = limit // 2 if keep is None else keep
        bos = self.tokenizer.bos_id
        n_bos = 1 if bos is not None and seqs[0][0][0] == bos else 0
        # Both prompt parts are prefixes of the same prompt tokenization, so dropping the same
        # count from both keeps them equal; the BOS (whether added or template-rendered) stays.
        droppable = min(pl for _, pl in seqs) - n_bos
        need = max(len(s) for s, _ in seqs) - limit
        drop = max(0, min(need, droppable - keep))
        out, cut = [], 0
        for tokens, prompt_len in seqs:
            tokens = tokens[:n_bos] + tokens[n_bos + drop :]
            prompt_len -= drop
            if len(tokens) > limit:
                tokens = tokens[:limit]
                cut += 1
            if len(tokens) <= prompt_len:
                raise RecordRejected(
                    "prompt_too_long",
                    f"the prompt keeps {prompt_len} tokens (--min-prompt-tokens {keep}), leaving "
                    f"no room for a completion in --max-seq-len {limit}",
                )
            out.append((tokens, prompt_len))
        return out, drop > 0, cut

"""Reading and validating preference JSONL, one line at a time.

Each line of the input holds one preference pair, in one of two forms:

* **plain**: ``{"prompt": str, "chosen": str, "rejected": str}``; a sequence is the text
  ``prompt + chosen`` (no separator is inserted: put it in the data).
* **conversational** (TRL, UltraFeedback-binarized): any of the three fields is a list of
  ``{"role": str, "content": str}`` messages. ``chosen``/``rejected`` are the assistant
  turn(s), or the whole conversation whose leading messages are the prompt:

  - ``prompt`` a message list that ``chosen`` starts with: those messages are stripped;
  - ``prompt`` a string (UltraFeedback): the messages ``chosen`` and ``rejected`` share at
    their start are the prompt; if they share none, the prompt is one user message;
  - no ``prompt``: the shared leading messages are the prompt (TRL's implicit prompt);
  - a string ``chosen``/``rejected`` next to a message list is one assistant message.

  The completion must start with an ``assistant`` message. Extra keys are ignored.

A bad line never raises out of :func:`parse_line`: it raises :class:`RecordRejected` with a
stable ``reason`` (one of :data:`REASONS`) and a human ``detail``; the pack tool writes both
to ``rejects.jsonl`` with the 1-based line number.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "REASONS",
    "Message",
    "PreferenceRecord",
    "RecordRejected",
    "iter_lines",
    "parse_line",
    "parse_record",
    "printable",
    "read_records",
]

Message = dict[str, str]
"""A chat message: ``{"role": ..., "content": ...}`` (both strings)."""

REASONS: dict[str, str] = {
    "blank_line": "the line is empty or only whitespace",
    "invalid_utf8": "the line is not valid UTF-8",
    "malformed_json": "the line is not one valid JSON value",
    "unreadable_json": "valid JSON too big to read: nesting too deep, or an integer of over 4300 digits",
    "invalid_unicode": "a used string holds a lone surrogate escape (\\ud800-\\udfff), which is no character",
    "wrong_type": "the line or a field has the wrong JSON type",
    "missing_field": "a required field (prompt, chosen, rejected, role, content) is absent",
    "empty_field": "a field is empty or only whitespace",
    "bad_role": "a completion does not start with an assistant message",
    "identical_chosen_rejected": "chosen and rejected are the same",
    "chat_template": "no chat template for a conversational line, or it failed or does not render the prompt as a prefix",
    "empty_completion": "a completion tokenizes to no tokens",
    "identical_tokens": "chosen and rejected are the same tokens after tokenizing/truncation",
    "prompt_too_long": "the prompt, truncated as far as allowed, leaves no room in --max-seq-len",
    "exceeds_pack_size": "the pair's two sequences together exceed --pack-size",
    "tokenizer_error": "the tokenizer raised an error on the line's text",
    "unexpected_error": "any other error while handling the line (its type and message in detail)",
}
"""Every reason a line can be rejected for, with its meaning (documented in the README)."""


class RecordRejected(Exception):
    """A line cannot become a training pair. ``reason`` is a key of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown reject reason {reason!r}; valid: {', '.join(REASONS)}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, kw_only=True)
class PreferenceRecord:
    """One validated input line.

    For the plain form the three fields are strings. For the conversational form they are
    lists of messages: ``prompt`` the prompt turns, ``chosen``/``rejected`` the completion
    turns only (the prompt already stripped off).
    """

    line: int
    """1-based line number in the input file."""
    prompt: str | list[Message]
    chosen: str | list[Message]
    rejected: str | list[Message]

    @property
    def conversational(self) -> bool:
        """True when the fields are message lists (a chat template renders them)."""
        return not isinstance(self.prompt, str)


def iter_lines(stream: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, raw_bytes)`` for each line of a binary stream, 1-based.

    The bytes keep their trailing newline (callers may count them for progress). A UTF-8
    byte-order mark at the start of line 1 is dropped.
    """
    for number, raw in enumerate(stream, start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        yield number, raw


def printable(text: str) -> str:
    """``text`` on one line, with what no terminal can print (lone surrogates) and line
    breaks as backslash escapes."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _is_blank(text: str) -> bool:
    return not text.strip()


def _check_text(value: str, where: str) -> None:
    """Reject a string that is not valid Unicode (a lone surrogate from a JSON escape)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RecordRejected(
            "invalid_unicode",
            f"'{where}' holds the lone surrogate U+{ord(value[exc.start]):04X} at character {exc.start}",
        ) from None


def _check_messages(value: list[Any], where: str) -> list[Message]:
    """Validate a message list; return it as plain ``{"role", "content"}`` dicts."""
    if not value:
        raise RecordRejected("empty_field", f"field '{where}' is an empty list")
    messages: list[Message] = []
    for k, msg in enumerate(value):
        name = f"{where}[{k}]"
        if not isinstance(msg, dict):
            raise RecordRejected(
                "wrong_type", f"'{name}' is {_type_name(msg)}, expected a {{role, content}} object"
            )
        for key in ("role", "content"):
            if key not in msg:
                raise RecordRejected("missing_field", f"'{name}' has no '{key}'")
            if not isinstance(msg[key], str):
                raise RecordRejected(
                    "wrong_type", f"'{name}.{key}' is {_type_name(msg[key])}, expected a string"
                )
            _check_text(msg[key], f"{name}.{key}")
        if _is_blank(msg["role"]):
            raise RecordRejected("empty_field", f"'{name}.role' is empty")
        messages.append({"role": msg["role"], "content": msg["content"]})
    return messages


def _field(obj: dict[str, Any], key: str, required: bool = True) -> str | list[Message] | None:
    """A top-level field checked for presence, type and emptiness."""
    if key not in obj:
        if required:
            raise RecordRejected("missing_field", f"no '{key}' field")
        return None
    value = obj[key]
    if isinstance(value, str):
        _check_text(value, key)
        if _is_blank(value):
            raise RecordRejected("empty_field", f"field '{key}' is empty or only whitespace")
        return value
    if isinstance(value, list):
        return _check_messages(value, key)
    raise RecordRejected(
        "wrong_type", f"field '{key}' is {_type_name(value)}, expected a string or a message list"
    )


def _shared_prefix(a: list[Message], b: list[Message]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _split_conversation(
    prompt: str | list[Message] | None, chosen: list[Message], rejected: list[Message]
) -> tuple[list[Message], list[Message], list[Message]]:
    """Resolve the conversational forms to (prompt turns, chosen turns, rejected turns)."""
    if isinstance(prompt, list):
        n = len(prompt)
        if chosen[:n] == prompt:
            chosen = chosen[n:]
        if rejected[:n] == prompt:
            rejected = rejected[n:]
        prompt_msgs = prompt
    else:
        shared = _shared_prefix(chosen, rejected)
        if shared:
            prompt_msgs, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        elif prompt is None:
            raise RecordRejected(
                "missing_field",
                "no 'prompt' field, and 'chosen' and 'rejected' share no leading messages "
                "to take it from",
            )
        else:
            prompt_msgs = [{"role": "user", "content": prompt}]
    if chosen == rejected:
        raise RecordRejected("identical_chosen_rejected", "chosen and rejected turns are equal")
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns:
            raise RecordRejected("empty_field", f"'{name}' has no messages after the prompt")
        if turns[0]["role"] != "assistant":
            raise RecordRejected(
                "bad_role",
                f"'{name}' completion starts with role '{turns[0]['role']}', expected 'assistant'",
            )
        if all(_is_blank(m["content"]) for m in turns):
            raise RecordRejected("empty_field", f"'{name}' completion content is empty")
    if all(_is_blank(m["content"]) for m in prompt_msgs):
        raise RecordRejected("empty_field", "the prompt messages have no content")
    return prompt_msgs, chosen, rejected


def parse_line(raw: bytes, line: int) -> PreferenceRecord:
    """Validate one raw JSONL line (bytes, newline included or not) into a record.

    Args:
        raw: the line's bytes.
        line: its 1-based line number (stored in the record).

    Returns:
        A :class:`PreferenceRecord`.

    Raises:
        RecordRejected: the line is unusable; ``reason`` says why (see :data:`REASONS`).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordRejected(
            "invalid_utf8", f"byte 0x{raw[exc.start]:02x} at column {exc.start + 1}: {exc.reason}"
        ) from None
    if _is_blank(text):
        raise RecordRejected("blank_line", "the line is empty")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordRejected("malformed_json", f"{exc.msg} at column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:  # int over 4300 digits; nesting too deep
        raise RecordRejected("unreadable_json", f"{type(exc).__name__}: {exc}") from None
    return parse_record(obj, line)


def parse_record(obj: Any, line: int) -> PreferenceRecord:
    """Validate one decoded row (a JSON object, or a Parquet/Arrow row as a dict) into a record.

    Args:
        obj: the row; anything else than a dict is rejected as ``wrong_type``.
        line: its line number (1-based in JSONL; the row index in Parquet/datasets inputs).

    Returns:
        A :class:`PreferenceRecord`.

    Raises:
        RecordRejected: the row is unusable; ``reason`` says why (see :data:`REASONS`).
    """
    if not isinstance(obj, dict):
        raise RecordRejected("wrong_type", f"the line is {_type_name(obj)}, expected a JSON object")
    chosen = _field(obj, "chosen")
    rejected = _field(obj, "rejected")
    conversational = isinstance(chosen, list) or isinstance(rejected, list)
    prompt = _field(obj, "prompt", required=not conversational)
    conversational = conversational or isinstance(prompt, list)
    if not conversational:
        assert isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str)
        if chosen == rejected:
            raise RecordRejected("identical_chosen_rejected", "chosen and rejected are equal")
        return PreferenceRecord(line=line, prompt=prompt, chosen=chosen, rejected=rejected)
    as_turns = [
        [{"role": "assistant", "content": v}] if isinstance(v, str) else v
        for v in (chosen, rejected)
    ]
    prompt_msgs, chosen_msgs, rejected_msgs = _split_conversation(prompt, *as_turns)
    return PreferenceRecord(
        line=line, prompt=prompt_msgs, chosen=chosen_msgs, rejected=rejected_msgs
    )


def read_records(path: str | Path) -> Iterator[PreferenceRecord | tuple[int, RecordRejected]]:
    """Parse every line of a JSONL file: a record, or ``(line, RecordRejected)`` for a bad one."""
    with open(path, "rb") as stream:
        for number, raw in iter_lines(stream):
            try:
                yield parse_line(raw, number)
            except RecordRejected as exc:
                yield number, exc

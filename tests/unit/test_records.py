"""Validation of preference JSONL lines: every reject reason and every accepted form."""

import io
import json

import pytest

from adadpo_megatron.data.records import (
    REASONS,
    PreferenceRecord,
    RecordRejected,
    iter_lines,
    parse_line,
    read_records,
)


def _line(obj) -> bytes:
    return json.dumps(obj).encode("utf-8") + b"\n"


def _reason(raw: bytes) -> str:
    with pytest.raises(RecordRejected) as info:
        parse_line(raw, 7)
    assert info.value.reason in REASONS
    return info.value.reason


U = {"role": "user", "content": "hi"}
A1 = {"role": "assistant", "content": "hello!"}
A2 = {"role": "assistant", "content": "go away"}


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\n", "blank_line"),
        (b"  \t \r\n", "blank_line"),
        (b'{"prompt": "\xff", "chosen": "a", "rejected": "b"}', "invalid_utf8"),
        (b'{"prompt": "p", "chosen": "a", ', "malformed_json"),
        (b'{"prompt": "p"} {"x": 1}', "malformed_json"),
        (b"[1, 2]", "wrong_type"),
        (b'"just a string"', "wrong_type"),
        (_line({"prompt": "p", "rejected": "b"}), "missing_field"),
        (_line({"prompt": "p", "chosen": "a"}), "missing_field"),
        (_line({"chosen": "a", "rejected": "b"}), "missing_field"),
        (_line({"prompt": "", "chosen": "a", "rejected": "b"}), "empty_field"),
        (_line({"prompt": "p", "chosen": "  \n", "rejected": "b"}), "empty_field"),
        (_line({"prompt": "p", "chosen": [], "rejected": "b"}), "empty_field"),
        (_line({"prompt": 3, "chosen": "a", "rejected": "b"}), "wrong_type"),
        (_line({"prompt": "p", "chosen": None, "rejected": "b"}), "wrong_type"),
        (_line({"prompt": "p", "chosen": "a", "rejected": {"text": "b"}}), "wrong_type"),
        (_line({"prompt": "p", "chosen": "a", "rejected": True}), "wrong_type"),
        (_line({"prompt": "p", "chosen": "same", "rejected": "same"}), "identical_chosen_rejected"),
        (_line({"prompt": [U], "chosen": [A1], "rejected": [A1]}), "identical_chosen_rejected"),
        (
            _line({"prompt": "hi", "chosen": [U, A1], "rejected": [U, A1]}),
            "identical_chosen_rejected",
        ),
        (
            _line({"prompt": [U], "chosen": [{"role": "assistant"}], "rejected": [A2]}),
            "missing_field",
        ),
        (_line({"prompt": [U], "chosen": [{"content": "x"}], "rejected": [A2]}), "missing_field"),
        (_line({"prompt": [U], "chosen": [A1], "rejected": ["text"]}), "wrong_type"),
        (
            _line(
                {"prompt": [U], "chosen": [{"role": "assistant", "content": [1]}], "rejected": [A2]}
            ),
            "wrong_type",
        ),
        (
            _line({"prompt": [U], "chosen": [{"role": "", "content": "x"}], "rejected": [A2]}),
            "empty_field",
        ),
        (_line({"prompt": [U], "chosen": [U, A1], "rejected": [A1]}), "identical_chosen_rejected"),
        (
            _line({"prompt": [U], "chosen": [{"role": "user", "content": "x"}], "rejected": [A2]}),
            "bad_role",
        ),
        (_line({"chosen": [A1], "rejected": [A2]}), "missing_field"),
        (
            _line({"prompt": [{"role": "user", "content": " "}], "chosen": [A1], "rejected": [A2]}),
            "empty_field",
        ),
        (
            _line(
                {"prompt": [U], "chosen": [{"role": "assistant", "content": ""}], "rejected": [A2]}
            ),
            "empty_field",
        ),
        (_line({"prompt": "hi", "chosen": [U, A1], "rejected": [U, A1, A2]}), "empty_field"),
    ],
)
def test_each_bad_line_gets_its_reason(raw: bytes, reason: str) -> None:
    assert _reason(raw) == reason


def test_reject_detail_names_the_field() -> None:
    with pytest.raises(RecordRejected) as info:
        parse_line(_line({"prompt": "p", "chosen": "a", "rejected": 5}), 3)
    assert "'rejected'" in info.value.detail and "a number" in info.value.detail
    with pytest.raises(RecordRejected) as info:
        parse_line(b'{"prompt": "\xc3\x28"}', 3)
    assert "0xc3" in info.value.detail and "column 13" in info.value.detail


def test_unknown_reason_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown reject reason"):
        RecordRejected("no_such_reason", "x")


def test_plain_form_is_kept_verbatim() -> None:
    rec = parse_line(_line({"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5", "extra": 1}), 4)
    assert rec == PreferenceRecord(line=4, prompt="Q: 2+2?", chosen=" 4", rejected=" 5")
    assert not rec.conversational


def test_conversational_explicit_prompt() -> None:
    rec = parse_line(_line({"prompt": [U], "chosen": [A1], "rejected": [A2]}), 1)
    assert rec.conversational
    assert (rec.prompt, rec.chosen, rec.rejected) == ([U], [A1], [A2])


def test_conversational_prompt_is_stripped_from_full_conversations() -> None:
    sys_msg = {"role": "system", "content": "be nice"}
    rec = parse_line(
        _line({"prompt": [sys_msg, U], "chosen": [sys_msg, U, A1], "rejected": [sys_msg, U, A2]}), 1
    )
    assert (rec.prompt, rec.chosen, rec.rejected) == ([sys_msg, U], [A1], [A2])


def test_ultrafeedback_binarized_form() -> None:
    # prompt is a string; chosen/rejected are whole conversations starting with it.
    rec = parse_line(
        _line({"prompt": "hi", "chosen": [U, A1], "rejected": [U, A2], "score_chosen": 8.0}), 2
    )
    assert (rec.prompt, rec.chosen, rec.rejected) == ([U], [A1], [A2])


def test_string_prompt_with_assistant_only_turns() -> None:
    rec = parse_line(_line({"prompt": "hi", "chosen": [A1], "rejected": [A2]}), 2)
    assert rec.prompt == [{"role": "user", "content": "hi"}]


def test_implicit_prompt_is_the_shared_prefix() -> None:
    rec = parse_line(_line({"chosen": [U, A1], "rejected": [U, A2]}), 2)
    assert (rec.prompt, rec.chosen, rec.rejected) == ([U], [A1], [A2])


def test_string_completions_next_to_a_message_prompt() -> None:
    rec = parse_line(_line({"prompt": [U], "chosen": "yes", "rejected": "no"}), 2)
    assert rec.chosen == [{"role": "assistant", "content": "yes"}]
    assert rec.rejected == [{"role": "assistant", "content": "no"}]


def test_multi_turn_completion_is_kept_whole() -> None:
    tool = {"role": "tool", "content": "42"}
    rec = parse_line(_line({"prompt": [U], "chosen": [A1, tool, A2], "rejected": [A2]}), 2)
    assert rec.chosen == [A1, tool, A2]


def test_iter_lines_numbers_from_one_and_drops_bom() -> None:
    data = b"\xef\xbb\xbf" + _line({"a": 1}) + b"\n" + b"last-without-newline"
    lines = list(iter_lines(io.BytesIO(data)))
    assert [n for n, _ in lines] == [1, 2, 3]
    assert lines[0][1].startswith(b"{") and lines[1][1] == b"\n"


def test_read_records_mixes_records_and_rejects(tmp_path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(_line({"prompt": "p", "chosen": "a", "rejected": "b"}) + b"oops\n")
    out = list(read_records(path))
    assert isinstance(out[0], PreferenceRecord) and out[0].line == 1
    assert out[1][0] == 2 and out[1][1].reason == "malformed_json"

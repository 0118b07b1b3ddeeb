"""adadpo-pack end to end: validation and rejects, BOS/EOS, truncation, templates, output dir."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data" / "pack"))
from pack_helpers import (  # noqa: E402
    mistral_sentencepiece_model,
    run_pack,
    sequences,
    train_sentencepiece,
    write_jsonl,
    write_wordlevel_tokenizer,
)

from adadpo_megatron.data import pack_tool  # noqa: E402
from adadpo_megatron.data.chat_template import ChatTemplate  # noqa: E402
from adadpo_megatron.data.packed_dataset import PackedPairDataset  # noqa: E402
from adadpo_megatron.data.records import RecordRejected  # noqa: E402
from adadpo_megatron.data.tokenizer import load_tokenizer  # noqa: E402

WORDS = [*"abcdefghijklmnopqrstuvwxyz", "User:", "Assistant:", "user:", "assistant:"]
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>"}


def wid(word: str) -> int:
    """Id of a word in the word-level test tokenizer (<unk> 0, <s> 1, </s> 2, then WORDS)."""
    return 3 + WORDS.index(word)


@pytest.fixture
def wordlevel(tmp_path: Path) -> Path:
    return write_wordlevel_tokenizer(tmp_path / "tok", WORDS, config=SPECIALS)


def run(tmp_path: Path, rows, tokenizer: Path, *flags: str, name: str = "out"):
    """Write rows, run adadpo-pack; return (exit code, output dir, meta or None, rejects)."""
    src = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    return run_pack(src, tmp_path / name, tokenizer, *flags)


U = {"role": "user", "content": "x"}
A = {"role": "assistant", "content": "y"}
BAD_LINES = [  # (line, expected reason or None for a packed pair)
    ({"prompt": "a b", "chosen": " c d", "rejected": " e f"}, None),
    (b"", "blank_line"),
    (b"   \t", "blank_line"),
    (b'{"prompt": "a\xff", "chosen": "c", "rejected": "d"}', "invalid_utf8"),
    (b'{"prompt": "a", "chosen": ', "malformed_json"),
    (b"[1, 2]", "wrong_type"),
    ({"prompt": "a", "rejected": " b"}, "missing_field"),
    ({"prompt": "a", "chosen": "", "rejected": " b"}, "empty_field"),
    ({"prompt": "a", "chosen": " b", "rejected": 7}, "wrong_type"),
    ({"prompt": "a", "chosen": " b", "rejected": " b"}, "identical_chosen_rejected"),
    ({"prompt": [U], "chosen": [{"role": "user", "content": "z"}], "rejected": [A]}, "bad_role"),
    ({"prompt": [{"role": "user", "content": "a b"}], "chosen": "c", "rejected": "d"}, None),
    ({"prompt": "a", "chosen": " zzz", "rejected": " yyy"}, "identical_tokens"),
    ({"prompt": "a b c d e f g", "chosen": " h", "rejected": " i"}, "prompt_too_long"),
    ({"prompt": "a b c", "chosen": " d e f", "rejected": " g h i"}, "exceeds_pack_size"),
    (b"", "blank_line"),  # the file ends with an empty line
]
BAD_FLAGS = (
    "--pack-size",
    "14",
    "--max-seq-len",
    "8",
    "--min-prompt-tokens",
    "7",
    "--chat-template",
    "plain",
)


@pytest.mark.parametrize("chunk_lines", [1, 3, 1024])
def test_every_bad_line_is_rejected_with_its_reason_and_counts_reconcile(
    tmp_path, wordlevel, capsys, monkeypatch, chunk_lines
):
    monkeypatch.setattr(pack_tool, "_CHUNK_LINES", chunk_lines)  # batches end anywhere
    rc, out, meta, rejects = run(tmp_path, [r for r, _ in BAD_LINES], wordlevel, *BAD_FLAGS)
    assert rc == 0
    expected = [{"line": n, "reason": why} for n, (_, why) in enumerate(BAD_LINES, 1) if why]
    assert [{"line": r["line"], "reason": r["reason"]} for r in rejects] == expected
    assert all(r["detail"] for r in rejects)
    assert meta["lines_read"] == len(BAD_LINES) == meta["pairs_packed"] + meta["lines_rejected"]
    assert meta["pairs_packed"] == 2 and meta["lines_rejected"] == len(expected)
    assert sum(meta["rejects_by_reason"].values()) == len(expected)
    assert meta["conversational_pairs"] == 1
    ds = PackedPairDataset(out)
    assert [ds.pair(j)["source_line"] for j in range(ds.num_pairs)] == [1, 12]
    summary = capsys.readouterr().out
    assert f"{len(BAD_LINES)} lines read = 2 pairs packed + {len(expected)} rejected" in summary


def test_strict_stops_at_the_first_bad_line_and_leaves_nothing(tmp_path, wordlevel, capsys):
    rc, out, meta, _ = run(tmp_path, [r for r, _ in BAD_LINES], wordlevel, *BAD_FLAGS, "--strict")
    assert rc == 1 and meta is None and not out.exists()
    err = capsys.readouterr().err
    assert f"{tmp_path / 'out.jsonl'}:2: blank_line" in err
    assert not list(tmp_path.glob("out.tmp-*"))


def test_strict_reports_bad_lines_in_line_order_across_stages(tmp_path, wordlevel, capsys):
    # Line 2 fails at tokenization (too long), line 3 already at parsing: line 2 comes first.
    rows = [
        {"prompt": "a", "chosen": " b", "rejected": " c"},
        {"prompt": "a b c d e f", "chosen": " g", "rejected": " h"},
        b"{oops",
    ]
    rc, *_ = run(tmp_path, rows, wordlevel, "--pack-size", "12", "--strict")
    assert rc == 1 and "out.jsonl:2: exceeds_pack_size" in capsys.readouterr().err


def test_sequences_are_bos_prompt_completion_eos_in_pair_order(tmp_path, wordlevel):
    rows = [
        {"prompt": "a b", "chosen": " c", "rejected": " d e"},
        {"prompt": "f", "chosen": " g", "rejected": " h"},
    ]
    rc, out, meta, _ = run(tmp_path, rows, wordlevel, "--pack-size", "64")
    assert rc == 0 and meta["add_bos"] and meta["add_eos"] and meta["token_dtype"] == "uint16"
    w = wid
    assert sequences(out) == [
        [1, w("a"), w("b"), w("c"), 2],
        [1, w("a"), w("b"), w("d"), w("e"), 2],
        [1, w("f"), w("g"), 2],
        [1, w("f"), w("h"), 2],
    ]
    index = np.load(out / "index.npz")
    assert index["seq_prompt_len"].tolist() == [3, 3, 2, 2]
    assert index["pair_source_line"].tolist() == [1, 2]
    assert index["seq_is_chosen"].tolist() == [True, False, True, False]
    assert meta["real_tokens"] == 5 + 6 + 4 + 4 and meta["num_packs"] == 1


def test_no_bos_no_eos(tmp_path, wordlevel):
    rows = [{"prompt": "a", "chosen": " b", "rejected": " c"}]
    _, out, meta, _ = run(tmp_path, rows, wordlevel, "--pack-size", "64", "--no-bos", "--no-eos")
    assert sequences(out) == [[wid("a"), wid("b")], [wid("a"), wid("c")]]
    assert not meta["add_bos"] and not meta["add_eos"]


def test_tokenizer_without_bos_needs_a_flag(tmp_path, capsys):
    bare = write_wordlevel_tokenizer(tmp_path / "bare", WORDS)  # no tokenizer_config.json
    rows = [{"prompt": "a", "chosen": " b", "rejected": " c"}]
    rc, *_ = run(tmp_path, rows, bare, "--pack-size", "64")
    assert rc == 1 and "--bos-token" in capsys.readouterr().err
    rc, out, _, _ = run(
        tmp_path, rows, bare, "--pack-size", "64", "--bos-token", "<s>", "--eos-token", "</s>"
    )
    assert rc == 0 and sequences(out)[0] == [1, wid("a"), wid("b"), 2]
    rc, *_ = run(tmp_path, rows, bare, "--pack-size", "64", "--bos-token", "nope", name="o2")
    assert rc == 1 and "'nope' is not a single token" in capsys.readouterr().err


def test_hf_bos_eos_from_the_post_processor(tmp_path):
    tok_path = write_wordlevel_tokenizer(tmp_path / "pp", WORDS, post_processor=True)
    tok = load_tokenizer(tok_path.parent)  # a directory works too
    assert (tok.kind, tok.bos_id, tok.eos_id, tok.bos_token) == ("hf", 1, 2, "<s>")
    assert tok.encode("a b") == [wid("a"), wid("b")]  # no post-processor specials
    assert tok.vocab_size == 3 + len(WORDS) and len(tok.fingerprint) == 64


def test_builtin_templates_render_exactly(wordlevel):
    from adadpo_megatron.data.chat_template import resolve_chat_template

    tok = load_tokenizer(wordlevel)
    conv = [{"role": "system", "content": "s"}, {"role": "user", "content": " u "}]
    reply = [{"role": "assistant", "content": "r"}]
    splits = {
        name: resolve_chat_template(name, tok).split(conv, reply)
        for name in ("chatml", "llama3", "plain")
    }
    assert splits["chatml"] == (
        "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\n u <|im_end|>\n<|im_start|>assistant\n",
        "r<|im_end|>\n",
    )
    hdr = "<|start_header_id|>{}<|end_header_id|>\n\n"
    assert splits["llama3"] == (
        hdr.format("system")
        + "s<|eot_id|>"
        + hdr.format("user")
        + "u<|eot_id|>"
        + hdr.format("assistant"),
        "r<|eot_id|>",
    )
    assert splits["plain"] == ("System: s\n\nUser:  u \n\nAssistant: ", "r\n\n")
    assert resolve_chat_template("auto", tok) is None and resolve_chat_template("none", tok) is None
    with pytest.raises(ValueError, match="ships no chat template"):
        resolve_chat_template("tokenizer", tok)


def test_truncation_cuts_the_prompt_from_the_left_first(tmp_path, wordlevel):
    rows = [{"prompt": "a b c d", "chosen": " e", "rejected": " f g h"}]
    _, out, meta, _ = run(
        tmp_path,
        rows,
        wordlevel,
        "--pack-size",
        "64",
        "--max-seq-len",
        "6",
        "--min-prompt-tokens",
        "1",
    )
    w = wid
    assert sequences(out) == [[1, w("d"), w("e"), 2], [1, w("d"), w("f"), w("g"), w("h"), 2]]
    assert meta["prompts_truncated"] == 1 and meta["completions_truncated"] == 0


def test_truncation_then_cuts_completions_from_the_right_eos_first(tmp_path, wordlevel):
    rows = [{"prompt": "a b c d", "chosen": " e", "rejected": " f g h"}]
    _, out, meta, _ = run(
        tmp_path,
        rows,
        wordlevel,
        "--pack-size",
        "64",
        "--max-seq-len",
        "6",
        "--min-prompt-tokens",
        "3",
    )
    w = wid
    assert sequences(out) == [
        [1, w("b"), w("c"), w("d"), w("e"), 2],
        [1, w("b"), w("c"), w("d"), w("f"), w("g")],
    ]
    assert np.load(out / "index.npz")["seq_prompt_len"].tolist() == [4, 4]
    assert meta["prompts_truncated"] == 1 and meta["completions_truncated"] == 1


def test_default_min_prompt_tokens_is_half_the_limit(tmp_path, wordlevel):
    rows = [{"prompt": "a b c d e f g h", "chosen": " i j k l m n o p", "rejected": " q"}]
    _, out, _, _ = run(tmp_path, rows, wordlevel, "--pack-size", "64", "--max-seq-len", "10")
    chosen = sequences(out)[0]
    assert len(chosen) == 10 and chosen[1:6] == [wid(c) for c in "defgh"]  # 5 = 10 // 2 kept


def test_identical_after_truncation_is_rejected(tmp_path, wordlevel):
    rows = [{"prompt": "a", "chosen": " b c d", "rejected": " b c e"}, {"prompt": "a", "chosen": " b", "rejected": " c"}]
    rc, _, meta, rejects = run(tmp_path, rows, wordlevel, "--pack-size", "64", "--max-seq-len", "4")
    assert rejects[0]["reason"] == "identical_tokens" and "after truncation" in rejects[0]["detail"]
    assert rc == 0 and meta["pairs_packed"] == 1


def test_nothing_packed_publishes_nothing(tmp_path, wordlevel, capsys):
    rows = [{"prompt": "a", "chosen": " b c d", "rejected": " b c e"}]
    rc, out, meta, _ = run(tmp_path, rows, wordlevel, "--pack-size", "64", "--max-seq-len", "4")
    err = capsys.readouterr().err
    assert rc == 1 and meta is None and not out.exists()  # nothing packed: no dataset at all
    assert "no pair was packed" in err and "out.jsonl:1: identical_tokens" in err
    assert not list(tmp_path.glob("out.tmp-*")) and len(err.strip().splitlines()) == 1


def test_align_counts_rounded_lengths_against_the_pack_size(tmp_path, wordlevel, capsys):
    rows = [{"prompt": "a", "chosen": " b", "rejected": " c"}]  # 4 + 4 tokens
    rc, _, _, _ = run(tmp_path, rows, wordlevel, "--pack-size", "8", "--align", "8", "--strict")
    assert rc == 1 and "exceeds_pack_size" in capsys.readouterr().err
    _, _, _, rejects = run(tmp_path, rows * 2, wordlevel, "--pack-size", "8", "--align", "4", name="o1")
    assert rejects == []
    rc, _, _, _ = run(tmp_path, rows, wordlevel, "--pack-size", "8", "--align", "8", name="o3")
    assert rc == 1 and "aligned to 8" in capsys.readouterr().err
    _, out, meta, _ = run(tmp_path, rows, wordlevel, "--pack-size", "16", "--align", "8", name="o2")
    assert meta["pairs_packed"] == 1 and np.load(out / "index.npz")["pack_tokens"].tolist() == [16]


def test_tokenizer_own_chat_template_and_no_doubled_bos(tmp_path):
    template = (
        "{% for m in messages %}{{ bos_token if loop.first else '' }}{{ m['role'] + ': ' + m['content'] + ' ' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    tok = write_wordlevel_tokenizer(
        tmp_path / "tok", WORDS, config={**SPECIALS, "chat_template": template}
    )
    rows = [{"prompt": [{"role": "user", "content": "a b"}], "chosen": "c", "rejected": "d e"}]
    _, out, meta, _ = run(tmp_path, rows, tok, "--pack-size", "64")
    w = wid
    assert sequences(out)[0] == [1, w("user:"), w("a"), w("b"), w("assistant:"), w("c"), 2]
    assert meta["chat_template"]["name"] == "tokenizer"
    assert np.load(out / "index.npz")["seq_prompt_len"].tolist() == [5, 5]


def test_conversational_line_without_a_template_is_a_reject(tmp_path, wordlevel, capsys):
    rows = [
        {"prompt": "a", "chosen": " b", "rejected": " c"},
        {"prompt": [U], "chosen": [A], "rejected": "z"},
    ]
    rc, out, meta, rejects = run(tmp_path, rows, wordlevel, "--pack-size", "64")
    assert rc == 0 and meta["pairs_packed"] == 1  # no single line stops the run
    assert rejects[0]["line"] == 2 and rejects[0]["reason"] == "chat_template"
    assert "pass --chat-template" in rejects[0]["detail"]
    rc, out, _, _ = run(tmp_path, rows[1:], wordlevel, "--pack-size", "64", name="conv")
    err = capsys.readouterr().err
    assert rc == 1 and not out.exists() and "conv.jsonl:1: chat_template: line 1 is in the conversational" in err


def test_template_failures_and_empty_completions_are_rejected(tmp_path, wordlevel):
    jinja = tmp_path / "t.jinja"
    jinja.write_text(
        "{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('boom turn') }}{% endif %}"
        "{{ m['role'] + ': ' }}{% if m['content'] != 'silent' %}{{ m['content'] + ' ' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    rows = [
        {"prompt": [{"role": "user", "content": "a"}], "chosen": "b", "rejected": "c"},
        {"prompt": [{"role": "user", "content": "a"}], "chosen": "boom", "rejected": "c"},
        {"prompt": [{"role": "user", "content": "a"}], "chosen": "silent", "rejected": "c"},
    ]
    _, _, meta, rejects = run(
        tmp_path, rows, wordlevel, "--pack-size", "64", "--chat-template", str(jinja)
    )
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (2, "chat_template"),
        (3, "empty_completion"),
    ]
    assert "boom turn" in rejects[0]["detail"] and meta["pairs_packed"] == 1


def test_template_whose_prompt_is_not_a_prefix_is_rejected():
    t = ChatTemplate(name="odd", source="{{ 'GEN' if add_generation_prompt else 'FULL' }}")
    with pytest.raises(RecordRejected, match="not a prefix") as info:
        t.split([U], [A])
    assert info.value.reason == "chat_template"
    with pytest.raises(ValueError, match="Jinja syntax error"):
        ChatTemplate(name="broken", source="{% for %}")


def test_unknown_template_name_lists_the_choices(tmp_path, wordlevel, capsys):
    rc, *_ = run(
        tmp_path,
        [{"prompt": "a", "chosen": " b", "rejected": " c"}],
        wordlevel,
        "--pack-size",
        "8",
        "--chat-template",
        "nope",
    )
    assert rc == 1 and "chatml, llama3, plain" in capsys.readouterr().err


def test_bad_numbers_name_their_flag(tmp_path, wordlevel, capsys):
    rows = [{"prompt": "a", "chosen": " b", "rejected": " c"}]
    assert run(tmp_path, rows, wordlevel, "--pack-size", "0")[0] == 1
    assert "--pack-size must be >= 1, got 0" in capsys.readouterr().err
    assert run(tmp_path, rows, wordlevel, "--pack-size", "8", "--max-seq-len", "1")[0] == 1
    assert "--max-seq-len must be >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(tmp_path, rows, wordlevel, "--pack-size", "8", "--seed", "-1")
    assert "--seed must be in [0, 2^64)" in capsys.readouterr().err


def test_existing_output_needs_overwrite_and_only_replaces_datasets(tmp_path, wordlevel, capsys):
    rows = [{"prompt": "a", "chosen": " b", "rejected": " c"}]
    assert run(tmp_path, rows, wordlevel, "--pack-size", "64")[0] == 0
    rc, out, meta, _ = run(tmp_path, rows, wordlevel, "--pack-size", "64", "--no-eos")
    assert rc == 1 and "pass --overwrite" in capsys.readouterr().err and meta["add_eos"]
    rc, out, meta, _ = run(
        tmp_path, rows, wordlevel, "--pack-size", "64", "--no-eos", "--overwrite"
    )
    assert rc == 0 and not meta["add_eos"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == [
        "out",
        "out.jsonl",
    ]
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    rc, *_ = run(tmp_path, rows, wordlevel, "--pack-size", "64", "--overwrite", name="other")
    assert rc == 1 and (other / "precious.txt").read_text() == "keep me"


def test_an_interrupted_run_leaves_no_directory(tmp_path, wordlevel, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pack_tool, "pack_pairs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(
            tmp_path,
            [{"prompt": "a", "chosen": " b", "rejected": " c"}],
            wordlevel,
            "--pack-size",
            "64",
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "tok"]


def test_same_input_gives_the_same_dataset_fingerprint(tmp_path, wordlevel):
    rows = [{"prompt": "a", "chosen": " b", "rejected": " c d"}] * 5
    _, _, meta1, _ = run(tmp_path, rows, wordlevel, "--pack-size", "16", name="one")
    _, _, meta2, _ = run(tmp_path, rows, wordlevel, "--pack-size", "16", name="two")
    _, _, meta3, _ = run(tmp_path, rows, wordlevel, "--pack-size", "32", name="three")
    assert (
        meta1["dataset_fingerprint"] == meta2["dataset_fingerprint"] != meta3["dataset_fingerprint"]
    )
    assert meta1["num_packs"] == 5 and meta3["num_packs"] == 2  # 9-token pairs: 1 or 3 a pack


def _decoded_segments(out: Path, tokenizer: Path, bos: int, eos: int):
    """(pair id, is_chosen, decoded text without BOS/EOS) of every segment of every pack."""
    tok = load_tokenizer(tokenizer)
    ds = PackedPairDataset(out)
    found = []
    for i in range(len(ds)):
        batch = ds[i]
        cu = batch["cu_seqlens"].tolist()
        for k in range(len(cu) - 1):
            seg = batch["tokens"][cu[k] : cu[k + 1]].tolist()
            assert seg[0] == bos and seg[-1] == eos
            found.append(
                (int(batch["pair_index"][k]), bool(batch["is_chosen"][k]), tok.decode(seg[1:-1]))
            )
    return sorted(found)


ROUND_TRIP_ROWS = [
    {
        "prompt": "What is the capital of France?",
        "chosen": " Paris.",
        "rejected": " Lyon, I think.",
    },
    {
        "prompt": "Question: ",
        "chosen": "the answer",
        "rejected": "no idea",
    },  # merges across the boundary
    {
        "prompt": "Écris un haïku 🤖\n\n",
        "chosen": "Silence  du matin",
        "rejected": "Je ne sais pas",
    },
    {"prompt": "  leading spaces", "chosen": "\ttab", "rejected": " plain"},
]


def _check_round_trip(tmp_path: Path, model: Path) -> None:
    rc, out, meta, _ = run(
        tmp_path, ROUND_TRIP_ROWS, model, "--pack-size", "256", "--algorithm", "bfd"
    )
    assert rc == 0 and meta["pairs_packed"] == len(ROUND_TRIP_ROWS)
    tok = load_tokenizer(model)
    want = sorted(
        (j, is_chosen, row["prompt"] + row["chosen" if is_chosen else "rejected"])
        for j, row in enumerate(ROUND_TRIP_ROWS)
        for is_chosen in (True, False)
    )
    assert _decoded_segments(out, model, tok.bos_id, tok.eos_id) == want
    ds = PackedPairDataset(out)
    prompt_lens = np.load(out / "index.npz")["seq_prompt_len"].reshape(-1, 2)
    merged = 0
    for j, row in enumerate(ROUND_TRIP_ROWS):
        pair = ds.pair(j)
        own = tok.encode(row["prompt"])
        for k, name in enumerate(("chosen", "rejected")):
            assert tok.decode(pair["prompt"][1:] + pair[name][:-1]) == row["prompt"] + row[name]
            full = tok.encode(row["prompt"] + row[name])
            assert pair["prompt"][1:] + pair[name][:-1] == full
            # A sequence's unscored prompt is the longest prefix agreeing with the prompt's own
            # tokens; on a boundary merge ("Question: " + "the") the merged token is scored.
            pairs = zip(own, full, strict=False)
            shared = next((n for n, (x, y) in enumerate(pairs) if x != y), len(own))
            assert prompt_lens[j, k] == 1 + shared
            merged += shared < len(own)
        assert len(pair["prompt"]) == min(prompt_lens[j])
    assert merged  # the "Question: " row exercises the merge path


def test_round_trip_with_a_tiny_sentencepiece_model(tmp_path):
    _check_round_trip(tmp_path, train_sentencepiece(tmp_path))


def test_round_trip_with_the_mistral_sentencepiece_model(tmp_path):
    model = mistral_sentencepiece_model()
    if model is None:
        pytest.skip("mistral-common not installed: pip install --no-deps mistral-common")
    _check_round_trip(tmp_path, model)
    conv = [
        {
            "prompt": [{"role": "user", "content": "Bonjour !"}],
            "chosen": "Salut.",
            "rejected": "Non.",
        }
    ]
    _, out, _, _ = run(
        tmp_path, conv, model, "--pack-size", "256", "--chat-template", "chatml", name="conv"
    )
    texts = [t for _, _, t in _decoded_segments(out, model, 1, 2)]
    head = "<|im_start|>user\nBonjour !<|im_end|>\n<|im_start|>assistant\n"
    assert sorted(texts) == sorted([head + "Salut.<|im_end|>\n", head + "Non.<|im_end|>\n"])


def test_help_documents_the_bos_eos_rule(capsys):
    with pytest.raises(SystemExit) as info:
        pack_tool.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert (
        "[BOS] + prompt + completion + [EOS]" in text
        and "--no-bos" in text
        and "rejects.jsonl" in text
    )

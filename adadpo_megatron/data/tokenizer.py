"""Tokenizers behind one small interface: sentencepiece ``.model`` files and HF ``tokenizer.json``.

:func:`load_tokenizer` picks the backend from the path:

* ``*.model`` (or a directory holding ``tokenizer.model`` and no ``tokenizer.json``):
  sentencepiece. BOS/EOS are the model's own ``bos_id``/``eos_id``.
* ``*.json`` (or a directory holding ``tokenizer.json``): the HF ``tokenizers`` library.
  BOS/EOS come from ``tokenizer_config.json`` (``bos_token``/``eos_token``) beside the file,
  else from the post-processor's template (the special token before/after ``$A``). The
  tokenizer's own chat template comes from ``chat_template.jinja`` or the ``chat_template``
  of ``tokenizer_config.json`` beside it.

``bos_token=``/``eos_token=`` (the pack tool's ``--bos-token``/``--eos-token``) override
both; the text must be a single token of the vocabulary.

:meth:`Tokenizer.encode` never adds special tokens: BOS/EOS placement is the pack tool's job.
The ``fingerprint`` is the sha256 of the model file's bytes (``.model`` or ``tokenizer.json``).
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

__all__ = ["HFTokenizer", "SentencePieceTokenizer", "Tokenizer", "load_tokenizer"]


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class Tokenizer(ABC):
    """The interface the pack tool and tests use; see the module docstring."""

    kind: str
    """``"sentencepiece"`` or ``"hf"``."""
    path: Path
    """The model file (``.model`` or ``tokenizer.json``)."""
    fingerprint: str
    """Hex sha256 of the model file's bytes."""
    vocab_size: int
    """Number of token ids (special/added tokens included); every id is below it."""
    bos_id: int | None
    eos_id: int | None
    bos_token: str | None
    """Text of the BOS token (handed to chat templates as ``bos_token``)."""
    eos_token: str | None
    chat_template: str | None
    """The tokenizer's own Jinja chat template, if it ships one."""
    template_vars: dict[str, str]
    """Extra string variables for the tokenizer's own template (``pad_token``, ...)."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS or any other added special token."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """:meth:`encode` of each text; backends override it to use all CPU cores."""
        return [self.encode(text) for text in texts]

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of a list of token ids (special tokens rendered as the backend does)."""

    @abstractmethod
    def token_to_id(self, text: str) -> int | None:
        """The id of a token given as text, or None if it is not one token of the vocabulary."""

    def _override_special(self, bos_token: str | None, eos_token: str | None) -> None:
        for role, text in (("bos", bos_token), ("eos", eos_token)):
            if text is None:
                continue
            token_id = self.token_to_id(text)
            if token_id is None:
                raise ValueError(
                    f"--{role}-token {text!r} is not a single token of {self.path}; pass the "
                    f"exact text of one vocabulary entry, or --no-{role}"
                )
            setattr(self, f"{role}_id", token_id)
            setattr(self, f"{role}_token", text)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model`` file."""

    kind = "sentencepiece"

    def __init__(
        self, path: str | Path, *, bos_token: str | None = None, eos_token: str | None = None
    ) -> None:
        import sentencepiece

        self.path = Path(path)
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        self.fingerprint = file_sha256(self.path)
        self.vocab_size = int(self._sp.get_piece_size())
        bos, eos = int(self._sp.bos_id()), int(self._sp.eos_id())
        self.bos_id = bos if bos >= 0 else None
        self.eos_id = eos if eos >= 0 else None
        self.bos_token = self._sp.id_to_piece(bos) if bos >= 0 else None
        self.eos_token = self._sp.id_to_piece(eos) if eos >= 0 else None
        self.chat_template = None
        self.template_vars = {}
        self._override_special(bos_token, eos_token)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (sentencepiece adds no BOS/EOS unless asked)."""
        return list(self._sp.encode(text, out_type=int))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, encoded by sentencepiece's thread pool (all cores)."""
        return [list(ids) for ids in self._sp.encode(texts, out_type=int)]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; sentencepiece drops control tokens such as BOS/EOS."""
        return str(self._sp.decode([int(i) for i in ids]))

    def token_to_id(self, text: str) -> int | None:
        """Id of the piece ``text``, or None if it is not a piece (maps to unk)."""
        token_id = int(self._sp.piece_to_id(text))
        if token_id == self._sp.unk_id() and text != self._sp.id_to_piece(token_id):
            return None
        return token_id


def _token_text(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string or ``{"content": ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _own_chat_template(config: dict[str, Any], directory: Path) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _post_processor_specials(tokenizer_json: dict[str, Any]) -> tuple[str | None, str | None]:
    """BOS/EOS texts from a TemplateProcessing post-processor: specials around ``$A``."""
    processor = tokenizer_json.get("post_processor") or {}
    candidates = [processor] + list(processor.get("processors") or [])
    for proc in candidates:
        single = proc.get("single") if isinstance(proc, dict) else None
        if not isinstance(single, list):
            continue
        pieces = [next(iter(p.items())) for p in single if isinstance(p, dict) and p]
        seq_at = next((k for k, (kind, _) in enumerate(pieces) if kind == "Sequence"), None)
        if seq_at is None:
            continue
        before = [v.get("id") for kind, v in pieces[:seq_at] if kind == "SpecialToken"]
        after = [v.get("id") for kind, v in pieces[seq_at + 1 :] if kind == "SpecialToken"]
        return (before[-1] if before else None), (after[0] if after else None)
    return None, None


class HFTokenizer(Tokenizer):
    """An HF ``tokenizer.json`` loaded with the ``tokenizers`` library."""

    kind = "hf"

    def __init__(
        self, path: str | Path, *, bos_token: str | None = None, eos_token: str | None = None
    ) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self.path = Path(path)
        self._tok = RustTokenizer.from_file(str(self.path))
        self.fingerprint = file_sha256(self.path)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        config_path = self.path.parent / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if config_path.is_file():
            config = json.loads(config_path.read_text(encoding="utf-8"))
        self.chat_template = _own_chat_template(config, self.path.parent)
        self.template_vars = {
            key: text
            for key, value in config.items()
            if key.endswith("_token") and (text := _token_text(value)) is not None
        }
        bos_text, eos_text = (
            _token_text(config.get("bos_token")),
            _token_text(config.get("eos_token")),
        )
        if bos_text is None and eos_text is None:
            bos_text, eos_text = _post_processor_specials(
                json.loads(self.path.read_text(encoding="utf-8"))
            )
        self.bos_token, self.eos_token = bos_text, eos_text
        self.bos_id = self.token_to_id(bos_text) if bos_text is not None else None
        self.eos_id = self.token_to_id(eos_text) if eos_text is not None else None
        self._override_special(bos_token, eos_token)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with ``add_special_tokens=False`` (no post-processor)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, encoded in parallel by the Rust library."""
        return [list(e.ids) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, special tokens kept (``skip_special_tokens=False``)."""
        return str(self._tok.decode([int(i) for i in ids], skip_special_tokens=False))

    def token_to_id(self, text: str) -> int | None:
        """Id of the vocabulary entry ``text``, or None."""
        token_id = self._tok.token_to_id(text)
        return None if token_id is None else int(token_id)


def load_tokenizer(
    path: str | Path, *, bos_token: str | None = None, eos_token: str | None = None
) -> Tokenizer:
    """Open a sentencepiece ``.model`` or an HF ``tokenizer.json`` (or a directory holding one).

    Args:
        path: file or directory (see the module docstring for how the backend is chosen).
        bos_token, eos_token: texts overriding the BOS/EOS tokens (single vocabulary entries).

    Returns:
        A :class:`Tokenizer`.

    Raises:
        FileNotFoundError: nothing usable at ``path``.
        ValueError: an override is not one token.
    """
    target = Path(path)
    if target.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (target / name).is_file():
                target = target / name
                break
        else:
            raise FileNotFoundError(
                f"--tokenizer {path}: the directory has neither tokenizer.json nor tokenizer.model"
            )
    if not target.is_file():
        raise FileNotFoundError(f"--tokenizer {path}: no such file")
    if target.suffix == ".json":
        return HFTokenizer(target, bos_token=bos_token, eos_token=eos_token)
    try:
        return SentencePieceTokenizer(target, bos_token=bos_token, eos_token=eos_token)
    except RuntimeError as exc:  # sentencepiece raises RuntimeError on a non-model file
        raise ValueError(
            f"--tokenizer {path}: not a sentencepiece model ({exc}); pass a .model file or an "
            "HF tokenizer.json"
        ) from None

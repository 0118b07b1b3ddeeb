"""Chat templates for the conversational input form, rendered with Jinja (``jinja2``).

``--chat-template`` takes:

* ``auto`` (default): the tokenizer's own template if it ships one, else none;
* ``tokenizer``: the tokenizer's own template (an error if it has none);
* ``none``: no template (a conversational line is then an error);
* a built-in name, :data:`BUILTIN_TEMPLATES`: ``chatml``, ``llama3``, ``plain``;
* a path to a ``.jinja`` file.

A template sees ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token`` (and,
for the tokenizer's own template, every ``*_token`` of its ``tokenizer_config.json``), as
HF ``apply_chat_template`` does. The built-ins never emit BOS/EOS themselves: the pack tool
adds them (see :mod:`adadpo_megatron.data.pack_tool`).

Splitting a conversation into prompt and completion text (:meth:`ChatTemplate.split`):
the prompt text is the prompt turns rendered with ``add_generation_prompt=True``, the
completion text is whatever the whole conversation's rendering adds after it. A template
whose prompt rendering is not a prefix of the whole rendering cannot be split, and the line
is rejected with reason ``chat_template``. Plain-string lines never go through a template.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adadpo_megatron.data.records import Message, RecordRejected

if TYPE_CHECKING:
    from adadpo_megatron.data.tokenizer import Tokenizer

__all__ = ["BUILTIN_TEMPLATES", "TEMPLATE_CHOICES", "ChatTemplate", "resolve_chat_template"]

BUILTIN_TEMPLATES: dict[str, str] = {
    # <|im_start|>role\ncontent<|im_end|>\n per turn (Qwen, OpenHermes, ...).
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Llama-3 instruct headers, without the <|begin_of_text|> (BOS is added by the pack tool).
    "llama3": (
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
        "+ message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    # Role-labelled plain text, no special tokens: works with any tokenizer.
    "plain": (
        "{% for message in messages %}"
        "{{ message['role'] | capitalize + ': ' + message['content'] + '\\n\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
    ),
}
"""Built-in templates selectable by name with ``--chat-template``."""

TEMPLATE_CHOICES: tuple[str, ...] = ("auto", "tokenizer", "none", *BUILTIN_TEMPLATES)
"""Names ``--chat-template`` accepts (besides a path to a ``.jinja`` file)."""


def _environment() -> Any:
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:  # pragma: no cover - jinja2 is installed with torch
        raise ImportError(
            "chat templates need jinja2: `pip install jinja2`, or use plain-string data with "
            "--chat-template none"
        ) from None

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, indent: int | None = None) -> str:
        return json.dumps(value, ensure_ascii=False, indent=indent)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = tojson
    return env


@dataclass(frozen=True, kw_only=True)
class ChatTemplate:
    """A compiled Jinja chat template and the variables it is rendered with."""

    name: str
    """``chatml``/``llama3``/``plain``, ``tokenizer``, or the ``.jinja`` path."""
    source: str
    """The Jinja source."""
    variables: dict[str, str] = field(default_factory=dict)
    """``bos_token``, ``eos_token`` and other special-token texts passed to the template."""

    def __post_init__(self) -> None:
        from jinja2 import TemplateSyntaxError

        try:
            compiled = _environment().from_string(self.source)
        except TemplateSyntaxError as exc:
            raise ValueError(
                f"--chat-template {self.name}: Jinja syntax error on template line "
                f"{exc.lineno}: {exc.message}"
            ) from None
        object.__setattr__(self, "_compiled", compiled)

    @property
    def sha256(self) -> str:
        """Hex sha256 of the template source (recorded in meta.json)."""
        return hashlib.sha256(self.source.encode("utf-8")).hexdigest()

    def render(self, messages: list[Message], add_generation_prompt: bool) -> str:
        """Render ``messages``; raises ``RecordRejected("chat_template", ...)`` on failure."""
        from jinja2 import TemplateError

        try:
            return str(
                self._compiled.render(  # type: ignore[attr-defined]
                    messages=messages, add_generation_prompt=add_generation_prompt, **self.variables
                )
            )
        except (TemplateError, Exception) as exc:  # any error of a template is the line's
            raise RecordRejected(
                "chat_template", f"template {self.name}: {type(exc).__name__}: {exc}"
            ) from None

    def split(self, prompt: list[Message], completion: list[Message]) -> tuple[str, str]:
        """(prompt text, completion text) of one conversation; see the module docstring."""
        prompt_text = self.render(prompt, add_generation_prompt=True)
        full_text = self.render(prompt + completion, add_generation_prompt=False)
        if not full_text.startswith(prompt_text):
            raise RecordRejected(
                "chat_template",
                f"template {self.name}: the prompt rendered with add_generation_prompt=True is "
                "not a prefix of the whole conversation's rendering",
            )
        return prompt_text, full_text[len(prompt_text) :]


def resolve_chat_template(name: str, tokenizer: Tokenizer) -> ChatTemplate | None:
    """The template ``--chat-template name`` selects for ``tokenizer``, or None for no template.

    Raises:
        ValueError: an unknown name, ``tokenizer`` for a tokenizer without a template, or a
            template with a Jinja syntax error.
    """
    variables = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
    if name == "none":
        return None
    if name in ("auto", "tokenizer"):
        if tokenizer.chat_template is None:
            if name == "auto":
                return None
            raise ValueError(
                f"--chat-template tokenizer: {tokenizer.path} ships no chat template (none in a "
                "tokenizer_config.json or chat_template.jinja beside it); name a built-in: "
                + ", ".join(BUILTIN_TEMPLATES)
            )
        own_vars = {**tokenizer.template_vars, **variables}
        return ChatTemplate(name="tokenizer", source=tokenizer.chat_template, variables=own_vars)
    if name in BUILTIN_TEMPLATES:
        return ChatTemplate(name=name, source=BUILTIN_TEMPLATES[name], variables=variables)
    path = Path(name)
    if path.suffix == ".jinja" and path.is_file():
        return ChatTemplate(
            name=str(path), source=path.read_text(encoding="utf-8"), variables=variables
        )
    raise ValueError(
        f"--chat-template {name!r}: not a known template; choose one of "
        f"{', '.join(TEMPLATE_CHOICES)} or give a path to an existing .jinja file"
    )

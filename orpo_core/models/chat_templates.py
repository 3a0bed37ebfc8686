"""Named chat templates and ``.jinja`` template files for ``model.chat_template``.

``model.chat_template`` is one of

* ``auto``: the tokenizer's own template, ChatML when it has none (:mod:`orpo_core.models.chat`);
* ``model``: the tokenizer's own template, required;
* a name of :data:`NAMED_TEMPLATES` (``chatml``, ``llama3``, ``zephyr``, ``mistral``, ``gemma``);
* a path to a ``.jinja`` file (relative to the working directory): its text is the template.

A named template brings its control tokens: those missing from the vocabulary are added as
special tokens (the model's embeddings are then resized, as for ChatML), and the end-of-turn
token becomes the eos token so generation stops at the end of the assistant turn (``chatml``:
``<|im_end|>``, ``llama3``: ``<|eot_id|>``, ``gemma``: ``<end_of_turn>``). ``zephyr`` and
``mistral`` end a turn with the tokenizer's own ``eos_token``, which they keep. The tokenizer's
BOS is never changed (see :mod:`orpo_core.models.chat`). The template is stored on the tokenizer, so
it is saved with the tokenized data and the trained model (``chat_template.jinja``), used by
the evaluation and embedded in GGUF exports.

The Jinja text of each template is written here after the public definitions, kept small:

* ``chatml``: TRL's ``setup_chat_format`` (:data:`orpo_core.models.tiny.CHATML_TEMPLATE`);
* ``llama3``: Meta-Llama-3-8B-Instruct's ``tokenizer_config.json``: ``bos_token``, then per
  message ``<|start_header_id|>ROLE<|end_header_id|>\\n\\n`` + trimmed content + ``<|eot_id|>``;
  generation prompt ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``;
* ``zephyr``: HuggingFaceH4/zephyr-7b-beta: ``<|ROLE|>\\n`` + content + ``eos_token`` + ``\\n``;
  generation prompt ``<|assistant|>\\n`` (the newlines the original's Jinja layout emits);
* ``mistral``: Mistral-7B-Instruct-v0.1: ``bos_token``, ``[INST] user [/INST]``, assistant
  content + ``eos_token``; roles must alternate user/assistant, no system role (raises, as the
  original); no separate generation prompt (the prompt ends with ``[/INST]``);
* ``gemma``: gemma-7b-it: ``bos_token``, ``<start_of_turn>ROLE\\n`` + trimmed content +
  ``<end_of_turn>\\n`` with ROLE ``model`` for the assistant; no system role (raises);
  generation prompt ``<start_of_turn>model\\n``.

Deviation from the originals: ``bos_token`` is emitted only when the tokenizer has one (the
originals assume it; transformers would render a missing one as ``None``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orpo_core.models.tiny import CHATML_TEMPLATE

__all__ = ["NamedTemplate", "NAMED_TEMPLATES", "CHAT_TEMPLATE_MODES", "ChatTemplateError", "is_template_file", "apply_chat_template_setting"]

_BOS = "{% if bos_token %}{{ bos_token }}{% endif %}"
_ALTERNATE = (
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
)


@dataclass(frozen=True)
class NamedTemplate:
    """A chat template with the control tokens it needs.

    Attributes:
        template: the Jinja text (``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``).
        special_tokens: control tokens added to the vocabulary when missing (special tokens).
        end_of_turn: the token ending an assistant turn, made the eos token; None keeps the tokenizer's eos.
    """

    template: str
    special_tokens: tuple[str, ...] = field(default_factory=tuple)
    end_of_turn: str | None = None


NAMED_TEMPLATES: dict[str, NamedTemplate] = {
    "chatml": NamedTemplate(CHATML_TEMPLATE, ("<|im_start|>", "<|im_end|>"), "<|im_end|>"),
    "llama3": NamedTemplate(
        _BOS
        + "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|eot_id|>",
    ),
    "zephyr": NamedTemplate(
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}",
    ),
    "mistral": NamedTemplate(
        _BOS
        + "{% for message in messages %}"
        + _ALTERNATE
        + "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
        "{% endfor %}",
    ),
    "gemma": NamedTemplate(
        _BOS
        + "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for message in messages %}"
        + _ALTERNATE
        + "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
        "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
        ("<start_of_turn>", "<end_of_turn>"),
        "<end_of_turn>",
    ),
}
"""``model.chat_template`` names -> templates (see the module docstring for their sources)."""

CHAT_TEMPLATE_MODES = ("auto", "model")
"""Settings that keep the tokenizer's own template."""


class ChatTemplateError(ValueError):
    """A ``model.chat_template`` setting that is neither a mode, a known name nor a readable ``.jinja`` file."""


def is_template_file(setting: str) -> bool:
    """Whether a ``model.chat_template`` value names a template file (ends with ``.jinja``)."""
    return setting.lower().endswith(".jinja")


def validate_setting(setting: str) -> str:
    """Return ``setting`` when valid: a mode, a name of :data:`NAMED_TEMPLATES` or an existing ``.jinja`` file.

    Raises:
        ChatTemplateError: anything else; the message lists the names.
    """
    if setting in CHAT_TEMPLATE_MODES or setting in NAMED_TEMPLATES:
        return setting
    if is_template_file(setting):
        p = Path(setting).expanduser()
        if not p.is_file():
            raise ChatTemplateError(f"chat template file {setting!r} not found")
        return setting
    raise ChatTemplateError(
        f"unknown chat template {setting!r}: expected auto, model, one of {', '.join(NAMED_TEMPLATES)}, or a path to a .jinja file"
    )


def read_template_file(path: str | Path) -> str:
    """The text of a ``.jinja`` template file (UTF-8; a trailing newline is kept as written).

    Raises:
        ChatTemplateError: missing, unreadable, not UTF-8, empty or not parseable Jinja; the message names the file.
    """
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ChatTemplateError(f"chat template file {str(p)!r} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ChatTemplateError(f"chat template file {str(p)!r} cannot be read: {e}") from None
    if not text.strip():
        raise ChatTemplateError(f"chat template file {str(p)!r} is empty")
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().parse(text)
    except TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template file {str(p)!r}, line {e.lineno}: {e.message}") from None
    return text


def apply_chat_template_setting(tokenizer: Any, setting: str) -> bool:
    """Install a named template or a template file on ``tokenizer`` (in place).

    Named: adds the template's missing control tokens as special tokens, makes its end-of-turn
    token the eos token (when it has one), sets the pad token to the eos token when missing.
    File: installs the text only (the tokenizer's tokens are unchanged).

    Args:
        tokenizer: a ``transformers`` tokenizer.
        setting: a name of :data:`NAMED_TEMPLATES` or a ``.jinja`` path (not ``auto`` / ``model``).

    Returns:
        True when tokens were added (``len(tokenizer)`` grew: resize the model's embeddings).

    Raises:
        ChatTemplateError: unknown name, unreadable file, or a template that needs an eos
            token the tokenizer lacks (``zephyr``, ``mistral``).
    """
    before = len(tokenizer)
    if is_template_file(setting):
        tokenizer.chat_template = read_template_file(setting)
        return False
    spec = NAMED_TEMPLATES.get(setting)
    if spec is None:
        raise ChatTemplateError(f"unknown chat template {setting!r}: expected one of {', '.join(NAMED_TEMPLATES)} or a .jinja file")
    vocab = tokenizer.get_vocab()
    missing = [t for t in spec.special_tokens if t not in vocab]
    present_not_special = [t for t in spec.special_tokens if t in vocab and t not in tokenizer.all_special_tokens]
    if missing or present_not_special:
        tokenizer.add_special_tokens({"extra_special_tokens": missing + present_not_special}, replace_extra_special_tokens=False)
    if spec.end_of_turn is not None:
        tokenizer.eos_token = spec.end_of_turn
    elif tokenizer.eos_token is None:
        raise ChatTemplateError(f"chat template {setting!r} ends turns with eos_token, but tokenizer {tokenizer.name_or_path!r} has none")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = spec.template
    return len(tokenizer) > before

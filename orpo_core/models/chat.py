"""Tokenizer loading and chat templates.

A base model usually ships without a chat template. ORPO trains the chat format
and the preference at once, so such a tokenizer gets ChatML, the way TRL's
former ``trl.models.utils.setup_chat_format`` did it (removed from recent TRL in
favour of ``clone_chat_template``; the ChatML template string is
:data:`orpo_core.models.chatml.CHATML_TEMPLATE`)::

    <|im_start|>user\\nHello<|im_end|>\\n<|im_start|>assistant\\nHi!<|im_end|>\\n

``<|im_start|>`` and ``<|im_end|>`` become special tokens, ``<|im_end|>`` the
end-of-sequence token (so generation stops at the end of the assistant turn), and
the pad token, when missing, is ``<|im_end|>`` (TRL's ``ChatMlSpecialTokens``).
When the tokens are new, the model's embedding matrix must be resized to
``len(tokenizer)`` before training (the ``added_tokens`` flag returned here and
recorded in ``tokenized/stats.json``).

Deviation from TRL: TRL also set ``bos_token = "<|im_start|>"``. We keep the
tokenizer's own BOS: for models whose tokenizer prepends BOS (Llama, Mistral),
TRL's choice makes every ``add_special_tokens=True`` encoding (lm-eval, corpus
perplexity, generation) start with a freshly initialised embedding instead of
the BOS the base model was pretrained with.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from orpo_core.models.chatml import CHATML_TEMPLATE

log = logging.getLogger(__name__)

CHATML_START = "<|im_start|>"
CHATML_END = "<|im_end|>"


class TokenizerLoadError(ValueError):
    """The tokenizer cannot be loaded or lacks what the recipe asks for.

    The message names the path or Hub id (and revision) that failed.
    """


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` carries a (non-empty) chat template, plain or named variants."""
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):
        return any(bool(v) for v in tpl.values())
    return bool(tpl)


def setup_chat_format(tokenizer: Any, *, overwrite: bool = False) -> bool:
    """Give ``tokenizer`` the ChatML chat format, in place.

    Follows TRL's former ``setup_chat_format`` (trl/models/utils.py, TRL <= 0.2x):
    adds ``<|im_start|>`` and ``<|im_end|>`` as special tokens, sets
    ``eos_token = "<|im_end|>"``, sets the pad token to ``<|im_end|>`` when the
    tokenizer has none, and installs :data:`orpo_core.models.chatml.CHATML_TEMPLATE`.
    Unlike TRL, the BOS token is left unchanged (see the module docstring).

    Args:
        tokenizer: a ``transformers`` tokenizer (modified in place).
        overwrite: replace an existing chat template (recipe ``chat_template: chatml``).

    Returns:
        True when tokens were added to the vocabulary (``len(tokenizer)`` grew), so the
        model's input/output embeddings must be resized to ``len(tokenizer)``; False when
        both ChatML tokens already existed.

    Raises:
        TokenizerLoadError: the tokenizer already has a chat template and ``overwrite`` is False
            (TRL raises in the same case).
    """
    if has_chat_template(tokenizer) and not overwrite:
        raise TokenizerLoadError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} already has a chat template; "
            "pass overwrite=True (recipe model.chat_template: chatml) to replace it with ChatML"
        )
    before = len(tokenizer)
    tokenizer.add_special_tokens(
        {"extra_special_tokens": [CHATML_START, CHATML_END]}, replace_extra_special_tokens=False
    )
    tokenizer.eos_token = CHATML_END
    if tokenizer.pad_token is None:
        tokenizer.pad_token = CHATML_END
    tokenizer.chat_template = CHATML_TEMPLATE
    return len(tokenizer) > before


def _looks_local(name: str) -> bool:
    """True for a string that can only be a filesystem path: it exists, starts with
    ``/``, ``.`` or ``~``, contains a backslash, or has more than one ``/`` (a Hub id
    is ``name`` or ``namespace/name``)."""
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1 or Path(name).exists()


def load_tokenizer(model_cfg: Any, work_dir: str | Path, seed: int = 0) -> tuple[Any, bool]:
    """Load the recipe's tokenizer and make sure it has a chat template and a pad token.

    Source: ``model_cfg.tokenizer`` when set (loaded without ``revision``, which
    belongs to the model), else the model itself
    (:func:`orpo_core.models.sources.resolve_model_source`: a ``tiny`` model is built under
    ``work_dir/base_model`` from ``seed``; a GGUF source gives the tokenizer of its converted
    folder, with the GGUF's own chat template, which ``auto`` keeps). Loaded with
    ``AutoTokenizer.from_pretrained(path, revision=model_cfg.revision,
    trust_remote_code=model_cfg.trust_remote_code)``.

    ``model_cfg.chat_template``:

    * ``auto``: keep the tokenizer's template; add ChatML (:func:`setup_chat_format`) when it has none;
    * ``chatml``: always ChatML (replaces the tokenizer's template);
    * ``model``: the tokenizer's own template is required;
    * another name of :data:`orpo_core.models.chat_templates.NAMED_TEMPLATES` (``llama3``, ``zephyr``,
      ``mistral``, ``gemma``) or a ``.jinja`` file: that template
      (:func:`orpo_core.models.chat_templates.apply_chat_template_setting`, adding its control tokens).

    When the tokenizer still has no pad token, ``pad_token = eos_token``.

    Args:
        model_cfg: the recipe's ``model`` section (:class:`orpo_core.config.ModelConfig`).
        work_dir: the run folder (``recipe.out_dir``).
        seed: seed of the tiny model (``recipe.seed``).

    Returns:
        ``(tokenizer, added_tokens)``; ``added_tokens`` is True when the chat format's tokens were
        added, so the model's embeddings must be resized to ``len(tokenizer)``.

    Raises:
        TokenizerLoadError: a local path that does not exist, a Hub id that cannot be
            loaded (unknown, gated, offline without cache), ``chat_template: model``
            with a tokenizer that has no template, a template file that cannot be read, or a
            tokenizer with neither pad nor eos token. The message names the path or id.
    """
    from transformers import AutoTokenizer

    if model_cfg.tokenizer:
        source, revision = str(model_cfg.tokenizer), None
    else:
        from orpo_core.models.sources import ModelSourceError, resolve_model_source

        try:
            resolved = resolve_model_source(model_cfg, work_dir, seed)
        except ModelSourceError as e:
            raise TokenizerLoadError(str(e)) from None
        source, revision = resolved.path, resolved.revision
    what = f"{source!r}" + (f" (revision {revision!r})" if revision else "")
    if _looks_local(source) and not Path(source).expanduser().is_dir():
        raise TokenizerLoadError(f"tokenizer path {what} does not exist or is not a folder")
    kwargs: dict[str, Any] = {"trust_remote_code": model_cfg.trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    try:
        tok = AutoTokenizer.from_pretrained(str(Path(source).expanduser()) if _looks_local(source) else source, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise TokenizerLoadError(f"cannot load the tokenizer {what}: {e}") from None
    if not getattr(tok, "is_fast", False):
        log.warning("tokenizer %s is not a fast (Rust) tokenizer: batched tokenization will be slow", what)

    mode = model_cfg.chat_template
    added = False
    if mode == "model":
        if not has_chat_template(tok):
            raise TokenizerLoadError(
                f"tokenizer {what} has no chat template but the recipe sets model.chat_template: model "
                "(use 'auto' to add ChatML to a base model)"
            )
    elif mode == "chatml" or (mode == "auto" and not has_chat_template(tok)):
        added = setup_chat_format(tok, overwrite=True)
        log.info("ChatML chat format set on %s (%s tokens added)", what, "new" if added else "no new")
    elif mode != "auto":
        from orpo_core.models.chat_templates import ChatTemplateError, apply_chat_template_setting

        try:
            added = apply_chat_template_setting(tok, mode)
        except ChatTemplateError as e:
            raise TokenizerLoadError(f"model.chat_template: {e}") from None
        log.info("chat template %s set on %s (%s tokens added)", mode, what, "new" if added else "no new")
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise TokenizerLoadError(f"tokenizer {what} has neither a pad token nor an eos token")
        tok.pad_token = tok.eos_token
    return tok, added


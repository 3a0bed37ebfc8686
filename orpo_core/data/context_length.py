"""``data.max_length`` against the model's context length, checked before any data is written.

:func:`model_context_length` reads the number of positions cheaply (the tiny model's recipe field,
or ``AutoConfig`` of the resolved source: only ``config.json`` of a Hub model is downloaded);
:func:`check_max_length` refuses a ``data.max_length`` above it with both numbers in the message.
Used by the tokenization stage (:func:`orpo_core.data.tokenize.tokenize_dataset`), ``orpo prep``
and the pipeline flow before its first stage.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: config attributes that give a model's context length (positions), first found wins
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def model_context_length(model_cfg: Any, work_dir: str | Path, seed: int = 0) -> tuple[int | None, str]:
    """The number of positions the recipe's model accepts, read cheaply from its config.

    ``tiny`` models: ``model.tiny.max_position_embeddings``; others:
    ``AutoConfig.from_pretrained`` of the resolved source (a GGUF is converted once, as the
    tokenizer needs anyway; a Hub id downloads ``config.json`` only), first of
    :data:`CONTEXT_KEYS` on the config or its ``text_config``.

    Returns:
        ``(positions, "<attribute> of <model>")``, or ``(None, reason)`` when the config cannot
        be read or has none of those attributes (the check is then skipped).
    """
    if model_cfg.is_tiny:
        return int(model_cfg.tiny.max_position_embeddings), "model.tiny.max_position_embeddings"
    from transformers import AutoConfig

    from orpo_core.models.sources import resolve_model_source

    try:
        src = resolve_model_source(model_cfg, work_dir, seed=seed)
        cfg = AutoConfig.from_pretrained(src.path, revision=src.revision, trust_remote_code=model_cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - the tokenizer load reports a missing model properly
        return None, f"config of {model_cfg.name_or_path} not readable ({type(e).__name__})"
    for c in (cfg, getattr(cfg, "text_config", None)):
        for key in CONTEXT_KEYS:
            v = getattr(c, key, None) if c is not None else None
            if isinstance(v, int) and v > 0:
                return v, f"{key} of {model_cfg.name_or_path}"
    return None, f"no context length in the config of {model_cfg.name_or_path}"


def check_max_length(recipe: Any) -> int | None:
    """Refuse ``data.max_length`` above the model's context length (:func:`model_context_length`)
    before any tokenization. Returns the context length (None when unknown).

    Raises:
        RecipeError: ``data.max_length`` > the model's positions; the message names both numbers.
    """
    from orpo_core.config import RecipeError

    ctx, where = model_context_length(recipe.require_model(), recipe.out_dir, seed=recipe.seed)
    if ctx is None:
        log.info("data.max_length not checked against the model: %s", where)
        return None
    if recipe.data.max_length > ctx:
        raise RecipeError(
            f"data.max_length ({recipe.data.max_length}) exceeds the model's context length ({ctx}, {where}): "
            f"set data.max_length to at most {ctx}"
        )
    return ctx

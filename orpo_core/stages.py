"""The pipeline's stages, each defined once: the recipe fields it reads and the code it runs.

:data:`STAGES` is the single source of what a stage depends on. The run bookkeeping
(:mod:`orpo_core.runs.cache`) builds each stage's cache key from it, and the stages themselves
record :func:`fields_hash` of their own fields in what they write (``stats.json``'s ``data_hash``,
the training resume signature, ``eval.json``'s ``eval_fields_hash``), so a resumed or reused output
is checked against exactly the fields that key covers.

Code is given as paths relative to the ``orpo_core`` package: a folder covers every file under it
(``*.py`` and data files such as lm-eval task YAMLs); :data:`COMMON_CODE` is part of every stage.
A stage's *own* folders (``data`` for prepare, ``training`` for train, ``evaluation`` for evaluate, ``publish`` for export)
belong to no other stage, so adding or moving a module there changes that stage's key alone.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping


@dataclass(frozen=True)
class Stage:
    """One cached stage.

    Attributes:
        name: ``generate``, ``prepare``, ``tokenize``, ``train``, ``evaluate`` or ``export``.
        fields: recipe fields the stage reads, as ``"section"`` or ``"section.key"``.
        code: ``orpo_core`` paths (folders or files) whose code the stage runs.
        exclude: paths under ``code`` that belong to another stage.
    """

    name: str
    fields: tuple[str, ...]
    code: tuple[str, ...]
    exclude: tuple[str, ...] = ()


COMMON_CODE = ("__init__.py", "config.py", "io.py", "stages.py")

_MODEL_FIELDS = (
    "model.name_or_path",
    "model.revision",
    "model.gguf_file",
    "model.tokenizer",
    "model.trust_remote_code",
    "model.chat_template",
    "model.tiny",
)

STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            # on-policy pairs from the base model (only for recipes with an ``onpolicy`` source)
            "generate",
            fields=(*_MODEL_FIELDS, "model.dtype", "model.attn_implementation", "train.precision", "data.sources", "seed"),
            code=("data/onpolicy.py", "data/synthetic/instructions", "data/nltk_data.py", "models"),
        ),
        Stage(
            "prepare",
            fields=("data.sources", "data.test_size", "data.min_score_margin", "data.dedup", "data.on_error",
                    "data.decontaminate", "seed"),
            code=("data",),
            exclude=("data/tokenize.py",),
        ),
        Stage(
            "tokenize",
            fields=(*_MODEL_FIELDS, "data.max_length", "data.max_prompt_length", "data.on_error", "seed"),
            code=("data/tokenize.py", "data/errors.py", "models"),
        ),
        Stage(
            "train",
            fields=("model", "orpo", "train", "peft", "seed", "data.max_length", "data.max_prompt_length"),
            code=("training", "models", "data/tokenize.py", "data/errors.py"),
        ),
        Stage(
            "evaluate",
            fields=("eval", "model", "seed", "orpo.beta", "data.max_length", "data.max_prompt_length"),
            code=("evaluation", "models", "training/loss.py", "data/synthetic"),
        ),
        Stage(
            "export",
            # the GGUF embeds the recipe (without its hub section) and names the base model
            fields=("run_name", "model", "data", "orpo", "train", "peft", "eval", "seed", "hub.license"),
            code=("publish", "models", "data/tokenize.py"),
        ),
    )
}


def recipe_fields(recipe: Mapping[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    """The named dotted fields of a recipe dict (``Recipe.to_dict()``); a missing parent gives None."""
    out: dict[str, Any] = {}
    for f in fields:
        node: Any = recipe
        for part in f.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        out[f] = node
    return out


def fields_hash(recipe: Any, stage: str) -> str:
    """sha256 (hex, 16 chars) of the canonical JSON of ``stage``'s recipe fields.

    Args:
        recipe: a :class:`orpo_core.config.Recipe` or its dict form.
        stage: a key of :data:`STAGES`.

    Raises:
        KeyError: unknown stage.
    """
    d = recipe.to_dict() if hasattr(recipe, "to_dict") else recipe
    payload = recipe_fields(d, STAGES[stage].fields)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

"""Prefect task: tokenization (``orpo_core.data.tokenize.tokenize_dataset``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from orpo_core.io import json_safe

from .artifacts import artifact_key, markdown_artifact

from .options import cached_task_options, load_recipe_dict

from .stage import stage_run


@task(**cached_task_options("tokenize"), description="Apply the chat template and tokenize the pairs.")
def tokenize_task(recipe: dict[str, Any], data_dir: str, out_dir: str) -> dict[str, Any]:
    """Tokenize ``data_dir`` (the prepare stage's folder) into ``out_dir`` (``<run>/tokenized``).

    Returns:
        ``{"stage": "tokenize", "path": out_dir, "stats": <stats.json>, "content_hash": ...}``.
        Cached on the data folder's content, the model's tokenizer fields, the data
        lengths and the code version.
    """
    from orpo_core.data.tokenize import tokenize_dataset

    r = load_recipe_dict(recipe)
    r.require_model()
    with stage_run("tokenize", {"recipe": recipe, "data_dir": data_dir, "out_dir": out_dir}) as box:
        stats = tokenize_dataset(r, Path(data_dir), Path(out_dir))
        box["result"] = {"stage": "tokenize", "path": str(out_dir), "stats": json_safe(stats)}
    from .ui import tokenization_markdown

    markdown_artifact(
        tokenization_markdown(stats, r.run_name), artifact_key(r.run_name, "tokenization-stats"), f"Tokenization stats of {r.run_name}"
    )
    return {**box["result"], "content_hash": box["content_hash"]}

"""Prefect task: data preparation (``orpo_core.data.prepare.prepare_dataset``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from orpo_core.io import json_safe

from .artifacts import artifact_key, markdown_artifact

from .options import cached_task_options, load_recipe_dict

from .stage import stage_run


@task(**cached_task_options("prepare"), description="Load, normalize, clean and split the preference data to Parquet.")
def prepare_task(recipe: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """Run data preparation into ``out_dir`` (``<run>/data``).

    Args:
        recipe: the validated recipe as a dict (``Recipe.to_dict()``).
        out_dir: output folder (``train.parquet``, ``test.parquet``, ``stats.json``).

    Returns:
        ``{"stage": "prepare", "path": out_dir, "stats": <stats.json>, "content_hash": ...}``.
        Cached on the source data's content, the data section, the seed and the code version
        (:mod:`orpo_core.runs.cache`).

    Raises:
        orpo_core.data.errors.DataError: bad input (file, row and field in the message).
    """
    from orpo_core.data.prepare import prepare_dataset

    r = load_recipe_dict(recipe)
    with stage_run("prepare", {"recipe": recipe, "out_dir": out_dir}) as box:
        stats = prepare_dataset(r, Path(out_dir))
        box["result"] = {"stage": "prepare", "path": str(out_dir), "stats": json_safe(stats)}
    from .ui import data_stats_markdown

    markdown_artifact(data_stats_markdown(stats, r.run_name), artifact_key(r.run_name, "data-stats"), f"Data preparation stats of {r.run_name}")
    return {**box["result"], "content_hash": box["content_hash"]}

"""Prefect task: data preparation (``orpo_core.data.prepare.prepare_dataset``)."""

from __future__ import annotations

from typing import Any

from prefect import task

from .options import cached_task_options
from .stage import run_file_stage


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

    from .ui import data_stats_markdown

    return run_file_stage("prepare", recipe, out_dir, prepare_dataset, data_stats_markdown, "data-stats", "Data preparation stats")

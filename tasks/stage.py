"""Bookkeeping around one stage execution: stamp cleared before, written after, logs forwarded."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from orpo_core.io import json_safe
from orpo_core.runs.cache import clear_stamp, stage_base_key, write_stamp

from .logs import library_logs_to_run, run_logger


def current_run_ids() -> dict[str, str | None]:
    """The running flow run's and task run's ids and names (``flow_run_id``, ``flow_run_name``,
    ``task_run_id``, ``task_run_name``; None outside Prefect). Stored in a stage's result, they
    name the run that produced it when a later run finds the stage cached."""
    from prefect.context import FlowRunContext, TaskRunContext

    fctx, tctx = FlowRunContext.get(), TaskRunContext.get()
    fr = fctx.flow_run if fctx is not None else None
    tr = tctx.task_run if tctx is not None else None
    return {
        "flow_run_id": str(fr.id) if fr is not None else None,
        "flow_run_name": fr.name if fr is not None else None,
        "task_run_id": str(tr.id) if tr is not None else None,
        "task_run_name": tr.name if tr is not None else None,
    }


def current_cache_key() -> str | None:
    """The cache key of the running task's transaction (None outside a cached task)."""
    from prefect.transactions import get_transaction

    txn = get_transaction()
    return getattr(txn, "key", None) if txn is not None else None


@contextlib.contextmanager
def stage_run(stage: str, inputs: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Bookkeeping around one stage execution.

    Clears the output folder's stamp first (a failed run must not leave a stamp
    vouching for a half-rewritten folder), forwards library logs to the run
    logs, and on success writes the stamp with the base key and the running
    transaction's cache key (see :mod:`orpo_core.runs.cache`). Yields a dict the
    caller fills with ``result`` (stored in the stamp); ``result["produced_by"]`` is set to
    :func:`current_run_ids` (the run summary of a later, cached run links to that flow run).
    """
    out_dir = Path(inputs["out_dir"])
    base = stage_base_key(stage, inputs)
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_stamp(out_dir)
    box: dict[str, Any] = {"base_key": base, "result": None}
    t0 = time.monotonic()
    with library_logs_to_run():
        yield box
    if isinstance(box.get("result"), dict):
        box["result"]["produced_by"] = current_run_ids()
    stamp = write_stamp(out_dir, stage, base, current_cache_key(), json_safe(box.get("result")))
    box["content_hash"] = stamp["content_hash"]
    box["seconds"] = round(time.monotonic() - t0, 2)
    run_logger().info("%s finished in %.1f s -> %s", stage, box["seconds"], out_dir)


def run_file_stage(stage: str, recipe: dict[str, Any], out_dir: str, build, markdown, artifact: str, title: str) -> dict[str, Any]:
    """One stage that writes files and a stats dict (generate, prepare), with its bookkeeping.

    Args:
        stage: the stage name (:data:`orpo_core.stages.STAGES`).
        recipe: the recipe dict passed to the task.
        out_dir: the stage folder.
        build: ``build(recipe: Recipe, out_dir: Path) -> stats`` (the library call).
        markdown: ``markdown(stats, run_name) -> str``, the stage's Prefect artifact.
        artifact: the artifact key's suffix (``<run>-<artifact>``); title: its description (``<title> of <run>``).

    Returns:
        ``{"stage", "path", "stats", "content_hash"}``.
    """
    from .artifacts import artifact_key, markdown_artifact
    from .options import load_recipe_dict

    r = load_recipe_dict(recipe)
    with stage_run(stage, {"recipe": recipe, "out_dir": out_dir}) as box:
        stats = build(r, Path(out_dir))
        box["result"] = {"stage": stage, "path": str(out_dir), "stats": json_safe(stats)}
    markdown_artifact(markdown(stats, r.run_name), artifact_key(r.run_name, artifact), f"{title} of {r.run_name}")
    return {**box["result"], "content_hash": box["content_hash"]}

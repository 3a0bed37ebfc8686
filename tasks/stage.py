"""Bookkeeping around one stage execution: stamp cleared before, written after, logs forwarded."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from orpo_core.io import json_safe
from orpo_core.runs.cache import clear_stamp, stage_base_key, write_stamp

from .logs import library_logs_to_run, run_logger


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
    caller fills with ``result`` (stored in the stamp).
    """
    out_dir = Path(inputs["out_dir"])
    base = stage_base_key(stage, inputs)
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_stamp(out_dir)
    box: dict[str, Any] = {"base_key": base, "result": None}
    t0 = time.monotonic()
    with library_logs_to_run():
        yield box
    stamp = write_stamp(out_dir, stage, base, current_cache_key(), json_safe(box.get("result")))
    box["content_hash"] = stamp["content_hash"]
    box["seconds"] = round(time.monotonic() - t0, 2)
    run_logger().info("%s finished in %.1f s -> %s", stage, box["seconds"], out_dir)

"""Prefect artifacts of the pipeline: keys, tables with readable numbers, markdown."""

from __future__ import annotations

import re
from typing import Any, Mapping

from orpo_core.io import SIG_DIGITS, json_safe, round_sig

from .logs import in_prefect_run, run_logger


def artifact_key(*parts: str) -> str:
    """An artifact key (lowercase letters, digits, dashes) from free text."""
    key = "-".join(parts).lower()
    key = re.sub(r"[^a-z0-9-]+", "-", key).strip("-")
    return re.sub(r"-{2,}", "-", key)[:100] or "orpo"


def flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, scalar) pairs of a nested dict; lists of scalars are joined."""
    out: list[tuple[str, Any]] = []
    if isinstance(d, Mapping):
        for k, v in d.items():
            out.extend(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(d, (list, tuple)):
        if all(not isinstance(v, (Mapping, list, tuple)) for v in d):
            out.append((prefix, ", ".join(str(v) for v in d)))
        else:
            for i, v in enumerate(d):
                out.extend(flatten(v, f"{prefix}.{i}"))
    else:
        out.append((prefix, d))
    return out


def readable_value(v: Any, digits: int = SIG_DIGITS) -> Any:
    """A table cell for people: floats rounded to ``digits`` significant digits, integral floats
    below 1e6 as ints (``178.0`` -> ``178``), magnitudes of 1e6 and more as a string in
    scientific notation (``1.431e+12``, not ``1431000000000``); other values as JSON-safe."""
    v = json_safe(v)
    if isinstance(v, bool) or not isinstance(v, float):
        return v
    if abs(v) >= 1e6:
        return f"{v:.{digits}g}"
    if v.is_integer():
        return int(v)
    return round_sig(v, digits)


def readable_rows(rows: list[dict[str, Any]], digits: int = SIG_DIGITS) -> list[dict[str, Any]]:
    """Table rows with every cell through :func:`readable_value` (4 significant digits, integral
    values without decimals)."""

    def one(v: Any) -> Any:
        return readable_value(v, digits)

    return [{str(k): one(v) for k, v in row.items()} for row in rows]


def point_of_run() -> str | None:
    """The sweep point of the running task (its ``name=value`` tags other than ``recipe=`` /
    ``stage=`` / ``flow=``, e.g. ``beta=0.05``), or None: artifact descriptions name it, since
    artifact keys only allow lowercase letters, digits and dashes (``…-b0-05-…``)."""
    try:
        from prefect.context import TaskRunContext

        ctx = TaskRunContext.get()
        tags = list(ctx.task_run.tags) if ctx is not None and ctx.task_run is not None else []
    except Exception:  # noqa: BLE001
        return None
    point = [t for t in tags if "=" in t and not t.startswith(("recipe=", "stage=", "flow="))]
    return ", ".join(sorted(point)) or None


def with_point(description: str) -> str:
    """``description`` followed by `` (sweep point beta=0.05)`` inside a sweep task."""
    point = point_of_run()
    return f"{description} (sweep point {point})" if point else description


def table_artifact(rows: list[dict[str, Any]], key: str, description: str) -> None:
    """Create a table artifact when running under Prefect (no-op otherwise); failures only warn.

    Floats are shown to 4 significant digits (:func:`readable_rows`); the files keep full precision.
    """
    if not in_prefect_run() or not rows:
        return
    from prefect.artifacts import create_table_artifact

    try:
        create_table_artifact(table=readable_rows(rows), key=key, description=with_point(description))
    except Exception as e:  # noqa: BLE001 - the UI is best effort, the stage result is not
        run_logger().warning("could not create table artifact %s: %s", key, e)


def markdown_artifact(markdown: str, key: str, description: str) -> None:
    """Create a markdown artifact when running under Prefect (no-op otherwise)."""
    if not in_prefect_run():
        return
    from prefect.artifacts import create_markdown_artifact

    try:
        create_markdown_artifact(markdown=markdown, key=key, description=with_point(description))
    except Exception as e:  # noqa: BLE001
        run_logger().warning("could not create markdown artifact %s: %s", key, e)


def stats_rows(stats: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Table rows ``{"key", "value"}`` of a stats dict (nested keys dotted)."""
    return [{"key": k, "value": v} for k, v in flatten(stats)]

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


def readable_rows(rows: list[dict[str, Any]], digits: int = SIG_DIGITS) -> list[dict[str, Any]]:
    """Table rows with every float rounded to ``digits`` significant digits (ints, strings unchanged)."""

    def one(v: Any) -> Any:
        v = json_safe(v)
        return round_sig(v, digits) if isinstance(v, float) else v

    return [{str(k): one(v) for k, v in row.items()} for row in rows]


def table_artifact(rows: list[dict[str, Any]], key: str, description: str) -> None:
    """Create a table artifact when running under Prefect (no-op otherwise); failures only warn.

    Floats are shown to 4 significant digits (:func:`readable_rows`); the files keep full precision.
    """
    if not in_prefect_run() or not rows:
        return
    from prefect.artifacts import create_table_artifact

    try:
        create_table_artifact(table=readable_rows(rows), key=key, description=description)
    except Exception as e:  # noqa: BLE001 - the UI is best effort, the stage result is not
        run_logger().warning("could not create table artifact %s: %s", key, e)


def markdown_artifact(markdown: str, key: str, description: str) -> None:
    """Create a markdown artifact when running under Prefect (no-op otherwise)."""
    if not in_prefect_run():
        return
    from prefect.artifacts import create_markdown_artifact

    try:
        create_markdown_artifact(markdown=markdown, key=key, description=description)
    except Exception as e:  # noqa: BLE001
        run_logger().warning("could not create markdown artifact %s: %s", key, e)


def stats_rows(stats: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Table rows ``{"key", "value"}`` of a stats dict (nested keys dotted)."""
    return [{"key": k, "value": v} for k, v in flatten(stats)]

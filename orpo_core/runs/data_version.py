"""What version of the training data (and recipe) a retraining run would see.

:func:`data_version` identifies each ``data.sources`` item without preparing it:

* a local file or folder: the sha256 of its content (:func:`orpo_core.runs.cache.source_fingerprint`);
* a Hub dataset pinned to a ``revision``: that revision;
* an unpinned Hub dataset: the commit the Hub serves now (``HfApi.dataset_info(...).sha``);
  offline or unreachable, the time bucket of :func:`orpo_core.runs.cache.unpinned_bucket`
  (``ORPO_UNPINNED_CACHE_HOURS``), so the source counts as new once per bucket;
* a synthetic source: its parameters.

The ``fingerprint`` also covers the whole resolved recipe, so a changed recipe counts as new input.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from orpo_core.runs.cache import hash_obj, source_fingerprint


def hub_dataset_sha(name: str, timeout_s: float = 15.0) -> str | None:
    """The current commit sha of Hub dataset ``name``, or None (offline, unreachable, not found)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or Path(name).expanduser().exists():
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(name, timeout=timeout_s).sha
    except Exception:  # noqa: BLE001 - any failure: fall back to the time bucket
        return None


def source_version(source: Mapping[str, Any]) -> str:
    """Identity of one source's current content (see module docstring)."""
    if source.get("synthetic") is not None:
        return "synthetic:" + hash_obj(source.get("synthetic"))[:16]
    if not source.get("revision") and not Path(str(source.get("path"))).expanduser().exists():
        sha = hub_dataset_sha(str(source.get("path")))
        if sha:
            return f"hub:{source.get('path')}@{sha}"
    return source_fingerprint(source)


def data_version(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """``{"fingerprint": sha256 of (sources, recipe), "sources": [per-source identity]}`` of a recipe dict."""
    sources = [source_version(s) for s in recipe["data"]["sources"]]
    return {"fingerprint": hash_obj({"sources": sources, "recipe": dict(recipe)}), "sources": sources}

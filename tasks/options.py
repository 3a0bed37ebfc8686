"""Prefect options of the pipeline's tasks: cache policy, result storage, retries.

Settings (environment variables, read when ``tasks`` is imported):


``ORPO_RESULT_STORAGE``
    Where task results (small JSON: paths and summaries) are persisted: a
    Prefect block slug such as ``s3-bucket/orpo-results`` or
    ``local-file-system/orpo``, or a local folder (``/…``, ``./…``, ``~/…``). Unset: Prefect's default
    (``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK`` or the local folder
    ``PREFECT_RESULTS_LOCAL_STORAGE_PATH``). Workers on several hosts need a
    shared storage *and* a shared output folder for caching to carry over.
``ORPO_RETRIES`` / ``ORPO_RETRY_BACKOFF_S``
    Retries per task of transient errors only (:func:`orpo_core.runs.retry.is_transient`; default 2, push: 3) and the first delay of the
    exponential backoff (default 10 s: 10, 20, 40 ...).
``ORPO_CACHE_EXPIRATION_H``
    Optional lifetime of cached results in hours (default: none).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.tasks import exponential_backoff

from orpo_core.runs.cache import stage_cache_key
from orpo_core.runs.retry import is_transient

RESULT_SERIALIZER = "json"


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def result_storage() -> str | Path | None:
    """The configured result storage (``ORPO_RESULT_STORAGE``): a block slug, a local folder
    (a value starting with ``/``, ``.`` or ``~``), or None for Prefect's default."""
    raw = os.environ.get("ORPO_RESULT_STORAGE") or None
    if raw and raw.startswith(("/", ".", "~")):
        return Path(raw).expanduser().resolve()
    return raw


def cache_expiration() -> timedelta | None:
    """Cached results' lifetime from ``ORPO_CACHE_EXPIRATION_H`` (None: never expire)."""
    h = os.environ.get("ORPO_CACHE_EXPIRATION_H")
    return timedelta(hours=float(h)) if h else None


def retry_options(default_retries: int = 2) -> dict[str, Any]:
    """``retries`` and exponential ``retry_delay_seconds`` for a task (see module docstring)."""
    retries = _env_int("ORPO_RETRIES", default_retries)
    backoff = _env_float("ORPO_RETRY_BACKOFF_S", 10.0)
    return {
        "retries": retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=backoff) if backoff > 0 else 0,
        "retry_jitter_factor": 0.2 if backoff > 0 else None,
    }


def state_exception(state: Any) -> BaseException | None:
    """The exception carried by a failed Prefect state, or None."""
    data = getattr(state, "data", None)
    if isinstance(data, BaseException):
        return data
    try:
        state.result()
    except BaseException as e:  # noqa: BLE001
        return e
    return None


def retry_if_transient(task, task_run, state) -> bool:
    """``retry_condition_fn`` of the cached stages: retry only :func:`is_transient` errors
    (training resumes from its latest checkpoint)."""
    return is_transient(state_exception(state))


def cached_task_options(stage: str) -> dict[str, Any]:
    """Task options of a cached stage: content cache policy, persisted JSON results, retries
    (exponential backoff, only for transient errors: :func:`retry_if_transient`)."""
    return {
        "name": stage,
        "cache_policy": StageCachePolicy(stage=stage),
        "persist_result": True,
        "result_serializer": RESULT_SERIALIZER,
        "result_storage": result_storage(),
        "cache_expiration": cache_expiration(),
        "retry_condition_fn": retry_if_transient,
        **retry_options(),
    }



@dataclass
class StageCachePolicy(CachePolicy):
    """Prefect cache policy of one pipeline stage (``prepare``, ``tokenize``, ``train``, ``evaluate``).

    ``compute_key`` returns :func:`orpo_core.runs.cache.stage_cache_key`: the stamp's key when
    the output folder is intact and was produced under the same base key, else a fresh random
    key (cache miss).

    The key is also written on the task run (``task_ctx.task_run.cache_key``): Prefect 3 keeps
    its cache key in the result store only, while the UI's task-run page shows the task run's
    ``cache_key`` field (Prefect 2's), which the server records from the task run that the
    engine sends with each state change. Without this the page says "Cache Key None" for every
    stage, cached or not.
    """

    stage: str = "prepare"

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        key = stage_cache_key(self.stage, inputs)
        task_run = getattr(task_ctx, "task_run", None)
        if task_run is not None and key:
            try:
                task_run.cache_key = key
            except (AttributeError, TypeError, ValueError):  # a frozen / foreign object: the UI field stays empty
                pass
        return key


def load_recipe_dict(recipe):
    """Validate a recipe dict (as passed between tasks) into a :class:`~orpo_core.config.Recipe`."""
    from orpo_core.config import recipe_from_dict

    return recipe_from_dict(dict(recipe), where="<task parameter recipe>")

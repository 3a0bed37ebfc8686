"""Shared pieces of the Prefect tasks: settings, stage bookkeeping, artifacts, log bridging.

Settings (environment variables, read when ``tasks`` is imported):

``ORPO_RESULT_STORAGE``
    Where task results (small JSON: paths and summaries) are persisted: a
    Prefect block slug such as ``s3-bucket/orpo-results`` or
    ``local-file-system/orpo``, or a local folder (``/…``, ``./…``, ``~/…``). Unset: Prefect's default
    (``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK`` or the local folder
    ``PREFECT_RESULTS_LOCAL_STORAGE_PATH``). Workers on several hosts need a
    shared storage *and* a shared output folder for caching to carry over.
``ORPO_RETRIES`` / ``ORPO_RETRY_BACKOFF_S``
    Retries per task of transient errors only (:func:`is_transient`; default 2, push: 3) and the first delay of the
    exponential backoff (default 10 s: 10, 20, 40 ...).
``ORPO_CACHE_EXPIRATION_H``
    Optional lifetime of cached results in hours (default: none).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Mapping

from prefect.tasks import exponential_backoff

logger = logging.getLogger(__name__)

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


def _is_cuda_oom(exc: BaseException) -> bool:
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (torch.cuda.OutOfMemoryError)
        return True
    return isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)


def is_transient(exc: BaseException | None) -> bool:
    """Whether a retry may help: network errors (connection, timeout), HTTP 429 / 5xx
    (:func:`orpo_core.hub.is_transient_error`) and CUDA out-of-memory, looked for in the
    exception and its causes. Everything else is permanent: bad recipe or data
    (``RecipeError``, ``DataError``), missing files, permission errors, a full disk,
    programming errors — a retry would fail the same way, so the task fails at once.
    """
    from orpo_core.hub import is_transient_error

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (PermissionError, FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError, TypeError, KeyError)):
            return False
        if _is_cuda_oom(exc) or is_transient_error(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


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
    from .caching import StageCachePolicy

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


def json_safe(obj: Any) -> Any:
    """JSON-compatible copy (non-finite floats -> None, paths -> str, unknown -> str)."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if hasattr(obj, "item") and callable(obj.item):
        with contextlib.suppress(Exception):
            return json_safe(obj.item())
    return str(obj)


def load_recipe_dict(recipe: Mapping[str, Any]):
    """Validate a recipe dict (as passed between tasks) into a :class:`Recipe`."""
    from orpo_core.config import recipe_from_dict

    return recipe_from_dict(dict(recipe), where="<task parameter recipe>")


def run_logger():
    """Prefect's run logger inside a run, else this module's logger."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logger


def current_cache_key() -> str | None:
    """The cache key of the running task's transaction (None outside a cached task)."""
    from prefect.transactions import get_transaction

    txn = get_transaction()
    return getattr(txn, "key", None) if txn is not None else None


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


def in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


SIG_DIGITS = 4


def round_sig(x: float, digits: int = SIG_DIGITS) -> float:
    """``x`` rounded to ``digits`` significant digits (non-finite values unchanged)."""
    if not math.isfinite(x) or x == 0:
        return x
    return float(f"{x:.{digits}g}")


def fmt_value(v: Any, digits: int = SIG_DIGITS) -> str:
    """A value for people: floats to ``digits`` significant digits, None as ``-``."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


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


# --------------------------------------------------------------------------- logs
class _ForwardToRunLogger(logging.Handler):
    """Forward library log records (transformers, orpo_core) to the Prefect run logger."""

    def __init__(self, target: Any, level: int = logging.INFO):
        super().__init__(level)
        self._target = target
        self._busy = False
        self._thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        # only this task's thread: parallel sweep points each forward their own records
        if self._busy or record.thread != self._thread:
            return
        self._busy = True
        try:
            self._target.log(record.levelno, "[%s] %s", record.name, record.getMessage())
        except Exception:  # noqa: BLE001
            pass
        finally:
            self._busy = False


def _extra_loggers() -> set[str]:
    from prefect.settings import get_current_settings

    raw = get_current_settings().logging.extra_loggers or []
    names = raw.split(",") if isinstance(raw, str) else list(raw)
    return {n.strip() for n in names if n and n.strip()}


_muted_lock = threading.Lock()
_muted: dict[str, tuple[list[logging.Handler], bool, int]] = {}


def _mute(lg: logging.Logger) -> None:
    """Detach a forwarded logger's own handlers and stop propagation (refcounted across threads),
    so each record is printed once, by Prefect's handlers, not also by the library's or the root's."""
    with _muted_lock:
        if lg.name in _muted:
            handlers, propagate, n = _muted[lg.name]
            _muted[lg.name] = (handlers, propagate, n + 1)
            return
        own = [h for h in lg.handlers if not isinstance(h, _ForwardToRunLogger)]
        for h in own:
            lg.removeHandler(h)
        _muted[lg.name] = (own, lg.propagate, 1)
        lg.propagate = False


def _unmute(lg: logging.Logger) -> None:
    with _muted_lock:
        handlers, propagate, n = _muted[lg.name]
        if n > 1:
            _muted[lg.name] = (handlers, propagate, n - 1)
            return
        del _muted[lg.name]
        for h in handlers:
            lg.addHandler(h)
        lg.propagate = propagate


NOISY_LOGGERS = ("transformers.generation.configuration_utils", "transformers.configuration_utils")


@contextlib.contextmanager
def library_logs_to_run(names: tuple[str, ...] = ("transformers", "orpo_core"), level: int = logging.INFO) -> Iterator[None]:
    """Send the named libraries' logs (INFO and up) to the Prefect run logs during the block.

    Each record becomes exactly one line on the console (Prefect's run-log handler prints it and
    ships it to the API): the libraries' own handlers (transformers installs one) are detached and
    propagation to the root logger is off during the block, restored after.
    Loggers already listed in ``PREFECT_LOGGING_EXTRA_LOGGERS`` are left alone
    (Prefect forwards them itself); outside a Prefect run this is a no-op.
    """
    if not in_prefect_run():
        yield
        return
    target = run_logger()
    try:
        skip = _extra_loggers()
    except Exception:  # noqa: BLE001
        skip = set()
    attached: list[tuple[logging.Logger, logging.Handler, int]] = []
    for name in names:
        if name in skip:
            continue
        lg = logging.getLogger(name)
        h = _ForwardToRunLogger(target, level)
        old_level = lg.level
        if lg.getEffectiveLevel() > level:
            lg.setLevel(level)
        _mute(lg)
        lg.addHandler(h)
        attached.append((lg, h, old_level))
    # per-call dumps (a whole GenerationConfig / model config for every generate() or load) drown the
    # run log: those loggers keep WARNING and up only during the block
    quieted = [(logging.getLogger(n), logging.getLogger(n).level) for n in NOISY_LOGGERS]
    for lg, _ in quieted:
        lg.setLevel(max(logging.WARNING, lg.level))
    try:
        yield
    finally:
        for lg, old in quieted:
            lg.setLevel(old)
        for lg, h, old_level in attached:
            lg.removeHandler(h)
            _unmute(lg)
            lg.setLevel(old_level)


# --------------------------------------------------------------------------- progress
PROGRESS_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "nll_loss", "log_odds_ratio", "eval_loss", "learning_rate")


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


def progress_markdown(step: int, max_steps: int, epoch: float | None, latest: Mapping[str, Any], elapsed_s: float, eta_s: float | None, done: bool = False) -> str:
    """The training-progress artifact's description: step / max steps, epoch, the latest logged
    loss and rewards/accuracies (4 significant digits), elapsed time and ETA, as a markdown table."""
    rows = [("step", f"{step} / {max_steps}" if max_steps else str(step))]
    if epoch is not None:
        rows.append(("epoch", f"{epoch:.2f}"))
    for k in PROGRESS_METRICS:
        if k in latest and latest[k] is not None:
            rows.append((k, fmt_value(float(latest[k]))))
    rows.append(("elapsed", _duration(elapsed_s)))
    rows.append(("ETA", "done" if done else _duration(eta_s)))
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def make_progress_callback(key: str, description: str = "training progress", min_interval_s: float = 5.0):
    """A ``transformers.TrainerCallback`` that mirrors training in a Prefect progress artifact.

    The artifact (created at ``on_train_begin``) shows ``global_step / max_steps`` as the bar and,
    as its description, a table with the step, epoch, the latest logged loss,
    rewards/accuracies, rewards/margins, learning rate, elapsed time and an ETA (time per step
    since this run started x remaining steps, so a resumed run estimates from its own steps).
    It is updated at most every ``min_interval_s`` seconds and at the end. Each Trainer log dict
    goes to the run logger as one line. Returns None outside Prefect.
    """
    if not in_prefect_run():
        return None
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from transformers.trainer_callback import TrainerCallback  # the submodule: thread-safe, unlike the lazy top-level name

    log = run_logger()

    class PrefectProgressCallback(TrainerCallback):
        def __init__(self) -> None:
            self.artifact_id = None
            self._last = 0.0
            self._last_step = -1
            self._t0 = time.monotonic()
            self._step0 = 0
            self.latest: dict[str, Any] = {}

        def _pct(self, state) -> float:
            if not state.max_steps:
                return 0.0
            return max(0.0, min(100.0, 100.0 * state.global_step / state.max_steps))

        def _eta(self, state) -> float | None:
            done = state.global_step - self._step0
            if done <= 0 or not state.max_steps:
                return None
            return (time.monotonic() - self._t0) / done * max(0, state.max_steps - state.global_step)

        def describe(self, state, done: bool = False) -> str:
            return f"{description}\n\n" + progress_markdown(
                state.global_step, state.max_steps, getattr(state, "epoch", None), self.latest, time.monotonic() - self._t0, self._eta(state), done
            )

        def _update(self, state, force: bool = False, done: bool = False) -> None:
            now = time.monotonic()
            if not force and (now - self._last < min_interval_s or state.global_step == self._last_step):
                return
            pct = round(self._pct(state), 1)
            try:
                if self.artifact_id is None:
                    self.artifact_id = create_progress_artifact(progress=pct, key=key, description=self.describe(state, done))
                else:
                    update_progress_artifact(artifact_id=self.artifact_id, progress=pct, description=self.describe(state, done))
                self._last, self._last_step = now, state.global_step
            except Exception as e:  # noqa: BLE001 - progress display must not break training
                log.warning("progress artifact update failed: %s", e)

        def on_train_begin(self, args, state, control, **kwargs):
            self._t0, self._step0 = time.monotonic(), state.global_step
            self._update(state, force=True)

        def on_step_end(self, args, state, control, **kwargs):
            self._update(state)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                self.latest.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
                shown = {k: (round_sig(v) if isinstance(v, float) else v) for k, v in logs.items()}
                log.info("step %d/%d %s", state.global_step, state.max_steps, json.dumps(json_safe(shown)))

        def on_train_end(self, args, state, control, **kwargs):
            self._update(state, force=True, done=True)

    return PrefectProgressCallback()


# --------------------------------------------------------------------------- stage bookkeeping
@contextlib.contextmanager
def stage_run(stage: str, inputs: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Bookkeeping around one stage execution.

    Clears the output folder's stamp first (a failed run must not leave a stamp
    vouching for a half-rewritten folder), forwards library logs to the run
    logs, and on success writes the stamp with the base key and the running
    transaction's cache key (see :mod:`tasks.caching`). Yields a dict the
    caller fills with ``result`` (stored in the stamp).
    """
    from .caching import clear_stamp, stage_base_key, write_stamp

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

"""Library logs (transformers, orpo_core) in the Prefect run logs, one line per record."""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Iterator

logger = logging.getLogger(__name__)


def run_logger():
    """Prefect's run logger inside a run, else this module's logger."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logger


def in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


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

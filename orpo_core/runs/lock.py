"""One run at a time per run folder: an OS file lock (``filelock``) plus an owner record.

:func:`run_folder_lock` takes ``<run>/.orpo-run.lock`` (``flock``: the kernel releases it when
the holding process ends, also on ``kill -9``) and writes ``<run>/.orpo-run.json`` (pid, host,
flow run id, start time). A second run on the same folder fails at once with
:class:`RunFolderBusy` naming the lock and its holder, or waits up to ``timeout_s``
(``ORPO_RUN_LOCK_TIMEOUT_S``, default 0 = fail fast). The record is removed on a clean exit,
so a record found when the lock is acquired belongs to a run that died: it is handed to the
caller (who marks that flow run Crashed) and replaced.

Because every stage of a run executes while its flow holds this lock, no run can delete or
overwrite the checkpoints or outputs of another live run in the same folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock, Timeout

from orpo_core.io import atomic_write_json

LOCK_NAME = ".orpo-run.lock"
OWNER_NAME = ".orpo-run.json"


class RunFolderBusy(RuntimeError):
    """Another live run holds the run folder's lock (message: folder, lock file, holder)."""


class RunFolderNotWritable(PermissionError):
    """The run folder (or its lock file) cannot be created or written (message names the path)."""


def lock_timeout_s() -> float:
    """``ORPO_RUN_LOCK_TIMEOUT_S`` (seconds to wait for a busy run folder; default 0: fail at once)."""
    try:
        return max(0.0, float(os.environ.get("ORPO_RUN_LOCK_TIMEOUT_S", "0")))
    except ValueError:
        return 0.0


def read_owner(run_dir: str | Path) -> dict[str, Any] | None:
    """The owner record of a run folder, or None (absent or unreadable)."""
    try:
        return json.loads((Path(run_dir) / OWNER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _describe(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "another process"
    parts = [f"pid {owner.get('pid')} on {owner.get('host')}"]
    if owner.get("flow_run_id"):
        parts.append(f"flow run {owner.get('flow_run_id')}")
    if owner.get("started"):
        parts.append(f"since {owner.get('started')}")
    return ", ".join(parts)


def _write_owner(run_dir: Path, record: dict[str, Any]) -> None:
    atomic_write_json(run_dir / OWNER_NAME, record, indent=1)


def ensure_free(run_dir: str | Path) -> None:
    """Fail at once when a live process holds the run folder, without taking it and without
    touching its owner record (a command checks this before starting a Prefect server; the
    flow then takes the lock itself with :func:`run_folder_lock`).

    Raises:
        RunFolderBusy: the folder's lock is held (message: folder, lock file, holder).
    """
    d = Path(run_dir)
    lock_path = d / LOCK_NAME
    if not lock_path.is_file():
        return
    lock = FileLock(lock_path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise _busy(d, lock_path) from None
    except OSError:
        return  # not readable/writable here: run_folder_lock reports it with the path
    lock.release()


def _busy(d: Path, lock_path: Path) -> RunFolderBusy:
    return RunFolderBusy(
        f"run folder {d} is in use by {_describe(read_owner(d))} (lock {lock_path}); "
        "wait for that run to end, or set ORPO_RUN_LOCK_TIMEOUT_S to wait for it"
    )


@contextlib.contextmanager
def run_folder_lock(run_dir: str | Path, flow_run_id: str | None = None, timeout_s: float | None = None) -> Iterator[dict[str, Any] | None]:
    """Hold the run folder for the duration of the block.

    Args:
        run_dir: the run folder (created if missing).
        flow_run_id: the holder's Prefect flow run id (recorded for the next run).
        timeout_s: seconds to wait for a busy folder (None: :func:`lock_timeout_s`).

    Yields:
        The owner record left by a previous run that died holding the folder, or None.

    Raises:
        RunFolderBusy: the folder is held by another live run after ``timeout_s``.
        RunFolderNotWritable: the folder or its lock file cannot be created/written.
    """
    d = Path(run_dir)
    wait = lock_timeout_s() if timeout_s is None else timeout_s
    lock_path = d / LOCK_NAME
    try:
        d.mkdir(parents=True, exist_ok=True)
        lock = FileLock(lock_path, timeout=wait)
        lock.acquire()
    except Timeout:
        raise _busy(d, lock_path) from None
    except PermissionError as e:
        raise RunFolderNotWritable(f"cannot write the run folder: {e.filename or lock_path}: {e.strerror}") from None
    try:
        previous = read_owner(d)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "flow_run_id": flow_run_id,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        try:
            _write_owner(d, record)
        except PermissionError as e:
            raise RunFolderNotWritable(f"cannot write the run folder: {e.filename or d / OWNER_NAME}: {e.strerror}") from None
        try:
            yield previous
        finally:
            with contextlib.suppress(OSError):
                if (read_owner(d) or {}).get("pid") == record["pid"]:
                    (d / OWNER_NAME).unlink()
    finally:
        lock.release()

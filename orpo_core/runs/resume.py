"""Whether a training run resumes from the checkpoints in its folder: one decision for the CLI
(``orpo train``) and the Prefect train task.

Checkpoints are *this configuration's* when they were written under the same train-stage base
key (:func:`orpo_core.runs.cache.stage_base_key`: recipe fields, tokenized data, code), recorded
in ``<train>/.stage-inprogress.json`` (:func:`training_marker`: written when training starts,
marked finished when it ends) or in the folder's stamp when the cached stage finished. Checkpoints of another configuration (same run folder, another ``orpo.beta`` or
other data) are deleted, so a new configuration never resumes from an old one — but never those
of a live process on this host that is still training into the folder: that is
:class:`~orpo_core.runs.lock.RunFolderBusy`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Iterator

from orpo_core.io import atomic_write_json
from orpo_core.runs.cache import INPROGRESS_NAME, read_stamp
from orpo_core.runs.lock import RunFolderBusy

logger = logging.getLogger(__name__)


def read_marker(out_dir: str | Path) -> dict[str, Any]:
    """The in-progress marker of a train folder (``base_key``, ``pid``, ``host``), or ``{}``."""
    try:
        return json.loads((Path(out_dir) / INPROGRESS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def live_writer(marker: dict[str, Any]) -> int | None:
    """The pid of another live process on this host that is training into the folder, else None."""
    pid = marker.get("pid")
    if not pid or pid == os.getpid() or marker.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return int(pid)
    return int(pid)


def resume_decision(out_dir: str | Path, base_key: str, log: Any = None) -> bool:
    """True when the checkpoints in ``out_dir/checkpoints`` belong to the configuration
    ``base_key``; stale checkpoints are removed (a warning on ``log``) and False is returned.

    Raises:
        RunFolderBusy: the stale checkpoints belong to another live process on this host.
    """
    out = Path(out_dir)
    ckpt = out / "checkpoints"
    marker = read_marker(out)
    stamp = read_stamp(out)
    same = marker.get("base_key") == base_key or bool(stamp and stamp.get("base_key") == base_key)
    if ckpt.is_dir() and any(ckpt.iterdir()) and not same:
        pid = live_writer(marker)
        if pid is not None:
            raise RunFolderBusy(f"{out} is being trained by live process {pid}: its checkpoints in {ckpt} are left alone")
        (log or logger).warning("removing checkpoints of another configuration in %s", ckpt)
        shutil.rmtree(ckpt)
    return same


@contextlib.contextmanager
def training_marker(out_dir: str | Path, base_key: str) -> Iterator[None]:
    """Record ``base_key`` with this process as the folder's trainer for the block.

    A failed or killed run leaves the record, so a retry knows its checkpoints; when the block
    succeeds the record stays with ``finished: true`` and no pid, so a later run of the same
    configuration resumes from the final checkpoint (no extra step) instead of starting over.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / INPROGRESS_NAME, {"base_key": base_key, "pid": os.getpid(), "host": socket.gethostname()})
    yield
    atomic_write_json(out / INPROGRESS_NAME, {"base_key": base_key, "finished": True})

"""The temporary Prefect server of ``orpo run``: started up front, and dying with its parent.

When ``PREFECT_API_URL`` is unset, Prefect starts a temporary server (uvicorn, a child
process) on first use and stops it at interpreter exit (``atexit``). A ``kill -9`` of the
parent skips ``atexit``, so the server used to live on. :func:`start_ephemeral_server`
starts that server itself, from the calling (main) thread, with
``prctl(PR_SET_PDEATHSIG, SIGTERM)`` set in the child on Linux: the kernel sends the
server SIGTERM as soon as its parent dies, however it dies. Prefect's own code then reuses
the running instance (``SubprocessASGIServer`` is a per-port singleton).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
from typing import Any

PR_SET_PDEATHSIG = 1
_POPEN = subprocess.Popen


def _die_with_parent(prctl: Any, parent_pid: int) -> None:  # runs in the child between fork and exec
    prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _popen_dying_with(prctl: Any):
    """A ``subprocess.Popen`` whose children get SIGTERM when this process dies (``prctl`` is
    resolved beforehand, in the parent: nothing but the syscall may run between fork and exec)."""

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen:
        parent = os.getpid()
        kwargs.setdefault("preexec_fn", lambda: _die_with_parent(prctl, parent))
        return _POPEN(*args, **kwargs)

    return popen


def start_ephemeral_server() -> int | None:
    """Start Prefect's temporary server now (when ``PREFECT_API_URL`` is unset and the ephemeral
    server is enabled) so that it is killed with this process; returns its pid, else None.

    Must be called from the main thread: ``PR_SET_PDEATHSIG`` fires when the *thread* that
    forked the child exits. On other platforms than Linux the server is started unchanged
    (Prefect's ``atexit`` still stops it on a normal exit).
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    from prefect.server.api import server as server_mod

    server = server_mod.SubprocessASGIServer()
    if not server.running:
        if sys.platform.startswith("linux"):
            # only uvicorn's Popen (start() runs it in this thread): patched for the call, restored after
            prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
            server_mod.subprocess.Popen = _popen_dying_with(prctl)  # type: ignore[assignment]
            try:
                server.start()
            finally:
                server_mod.subprocess.Popen = _POPEN  # type: ignore[assignment]
        else:  # pragma: no cover
            server.start()
    return server.server_process.pid if server.server_process else None

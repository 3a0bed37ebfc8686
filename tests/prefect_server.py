"""A real ``prefect server start`` for tests: own PREFECT_HOME, a free loopback port, bounded waits.

:class:`PrefectServer` starts the server in its own process group, waits (bounded) for
``/api/health``, and stops the whole group on exit. ``env()`` gives the environment a
subprocess (``prefect`` CLI, a worker) needs to talk to it; ``settings()`` points the
in-process Prefect client at it. The scheduler loops are shortened so that schedule tests
do not wait a minute.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Mapping

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = float(os.environ.get("ORPO_TEST_SERVER_TIMEOUT_S", "180"))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The current environment without any Prefect API/profile settings, with ``PREFECT_HOME=home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_CLI_PROMPT="false",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        NO_COLOR="1",
        COLUMNS="200",
        # a loaded CI machine can take longer than Prefect's 20 s to start a temporary server
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
    )
    env.update(extra or {})
    return env


class PrefectServer:
    """``prefect server start`` on ``127.0.0.1:<free port>`` with a temporary PREFECT_HOME.

    Args:
        home: the server's PREFECT_HOME (its SQLite database lives there).
        log_path: where the server's stdout/stderr go (read by tests on failure).
    """

    def __init__(self, home: Path, log_path: Path):
        self.home = Path(home)
        self.log_path = Path(log_path)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.proc: subprocess.Popen | None = None

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a subprocess that talks to this server."""
        return clean_env(self.home, {"PREFECT_API_URL": self.url, **extra})

    def start(self, timeout_s: float = STARTUP_TIMEOUT_S) -> "PrefectServer":
        """Start and wait for ``/health`` (RuntimeError with the log tail after ``timeout_s``)."""
        self.home.mkdir(parents=True, exist_ok=True)
        env = clean_env(
            self.home,
            {
                # schedule new deployments within seconds instead of a minute
                "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
                "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1",
                "PREFECT_SERVER_UI_ENABLED": "false",
                "PREFECT_UI_ENABLED": "false",
            },
        )
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() kills uvicorn and children together
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"prefect server not healthy after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        """The last ``n`` characters of the server's output."""
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL after 15 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)

    @contextlib.contextmanager
    def settings(self) -> Iterator[None]:
        """Point this process's Prefect client at the server during the block."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.url}):
            yield


def prefect_cli(server: PrefectServer, *args: str, timeout_s: float = 180, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    """Run ``prefect --no-prompt <args>`` against ``server`` from ``cwd``; output captured (text)."""
    return subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", *args],
        cwd=cwd,
        env=server.env(**env),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def wait_for(predicate, timeout_s: float, interval_s: float = 1.0, what: str = "condition"):
    """Poll ``predicate()`` until it returns a truthy value (returned) or ``timeout_s`` passes (TimeoutError)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)

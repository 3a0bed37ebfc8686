"""Shared fixtures. Prefect state is isolated in a temp PREFECT_HOME set before any import of prefect."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import pytest

_PREFECT_TMP = tempfile.mkdtemp(prefix="orpo-test-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_TMP
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(Path(_PREFECT_TMP) / "results")
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(Path(_PREFECT_TMP) / "storage")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
# train.precision: auto would train in bf16 autocast on a CPU with avx512_bf16/amx_bf16, and many tests
# compare layouts or resumed runs to 1e-5; they run in fp32 on every machine. tests/test_precision.py
# forces or clears it per test (a real bf16 run included).
os.environ.setdefault("ORPO_CPU_BF16", "0")

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("ORPO_SHARED_DIR", ROOT.parent / "shared"))
SHARED_DATA = SHARED / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data; skips the test when it is absent (fresh clone elsewhere)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (tests using real data run in CI)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A seeded random-init SmolLM3-style model (hidden 64, 2 layers) with the byte-level ChatML tokenizer."""
    from orpo_core.config import TinyModelConfig
    from orpo_core.models.tiny import build_tiny_model

    return build_tiny_model(TinyModelConfig(), tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_tok(tiny_model_dir):
    """The tokenizer of :func:`tiny_model_dir`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session (about 15 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
        _drain_prefect_workers(timeout_s=30)


def _drain_prefect_workers(timeout_s: float) -> None:
    """Stop Prefect's log and event workers, waiting at most ``timeout_s`` for each.

    ``prefect_test_harness`` drains them on exit without a timeout; on 2026-12-06 that drain
    hung after the last test (pytest idle for minutes in ``run_coro_as_sync(drain_workers())``,
    the worker's event loop waiting on a future that never resolved), which would hold CI until
    its own limit. ``drain_all`` stops and removes each instance before waiting, so after this
    the harness's drain finds nothing left to wait for.
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        _, pending = service.drain_all(timeout=timeout_s, at_exit=False)
        if pending:
            warnings.warn(f"{service.__name__}: {len(pending)} worker(s) did not drain in {timeout_s} s; left behind")


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One real ``prefect server start`` (temp PREFECT_HOME, free loopback port) shared by the
    real-server tests (tests/prefect_server.py); stopped, process group and all, at the end."""
    from prefect_server import PrefectServer

    home = tmp_path_factory.mktemp("prefect-server-home")
    server = PrefectServer(home, home / "server.log").start()
    try:
        yield server
    finally:
        server.stop()

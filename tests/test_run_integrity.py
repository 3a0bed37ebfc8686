"""Run-folder integrity with real processes (issue 22): every writer holds the run-folder lock,
staging leftovers of killed processes are cleaned, nothing mixes two versions.

Each test starts the real ``orpo`` CLI (``python -m flows.cli``) in its own process group on a
tiny offline recipe (random-init model, char tokenizer, synthetic data) and kills what it
started at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.prefect_server import clean_env, wait_for
from tiny_recipe import tiny_recipe, write_recipe

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _recipe(tmp_path: Path, n_rows: int = 400, max_steps: int = 4) -> Path:
    return write_recipe(tmp_path / "recipe.yaml", tiny_recipe(
        "integrity", tmp_path / "run", seed=3, tiny={"max_position_embeddings": 128, "tokenizer": "char"},
        data={"sources": [{"synthetic": {"task": "arithmetic", "n_rows": n_rows}}], "test_size": 0.1, "max_length": 64,
              "max_prompt_length": 40},
        train={"learning_rate": 1e-3, "max_steps": max_steps, "per_device_train_batch_size": 8, "logging_steps": 2,
               "save_steps": 1000, "eval_steps": 1000},
        eval={"bootstrap_samples": 20, "max_new_tokens": 4, "prompts": [], "tasks": []},
        hub={"repo_id": "someone/integrity-tiny", "push": False},
    ))


def _orpo(tmp_path: Path, *args: str, **env: str) -> subprocess.Popen:
    """Start ``orpo <args>`` (its own process group; stdout/stderr to files under tmp_path)."""
    name = f"{args[0]}-{time.monotonic_ns()}"
    out = open(tmp_path / f"{name}.out", "wb")
    err = open(tmp_path / f"{name}.err", "wb")
    p = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=ROOT,
        env=clean_env(tmp_path / "prefect-home", {"ORPO_RUN_LOCK_TIMEOUT_S": "0", **env}),
        stdout=out,
        stderr=err,
        start_new_session=True,
    )
    p.out_path, p.err_path = tmp_path / f"{name}.out", tmp_path / f"{name}.err"  # type: ignore[attr-defined]
    out.close()
    err.close()
    return p


def _finish(p: subprocess.Popen, timeout_s: float = 300) -> tuple[int, str]:
    rc = p.wait(timeout=timeout_s)
    return rc, p.err_path.read_text(errors="replace")  # type: ignore[attr-defined]


def _kill(p: subprocess.Popen) -> None:
    """SIGKILL the process group this test started (the CLI, its temporary server, workers)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        p.wait(timeout=30)


def _tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(folder)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def _owner_pid(run: Path) -> int | None:
    try:
        return json.loads((run / ".orpo-run.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def test_commands_during_a_run_fail_fast_naming_the_holder(tmp_path):
    """While `orpo run` trains: prep (the issue's n_rows change), eval, sweep and push each exit 1
    at once with RunFolderBusy naming the run's pid; data/ and tokenized/ stay byte-identical and
    the run keeps training."""
    recipe = _recipe(tmp_path, n_rows=300, max_steps=5000)
    run = tmp_path / "run"
    holder = _orpo(tmp_path, "run", str(recipe))
    try:
        wait_for(lambda: (run / "train").is_dir() and _owner_pid(run) == holder.pid and holder.poll() is None,
                 timeout_s=240, interval_s=0.5, what="`orpo run` training")
        before = {d: _tree_hash(run / d) for d in ("data", "tokenized")}
        others = {
            "prep": _orpo(tmp_path, "prep", str(recipe), "--set", "data.sources.0.synthetic.n_rows=400"),
            "eval": _orpo(tmp_path, "eval", str(recipe)),
            "sweep": _orpo(tmp_path, "sweep", str(recipe), "--grid", "data.test_size=0.02,0.05"),
            "push": _orpo(tmp_path, "push", str(recipe)),
        }
        results = {k: _finish(p, 240) for k, p in others.items()}
        assert holder.poll() is None, "the run must still be training"
        for name, (rc, err) in results.items():
            assert rc == 1, (name, err[-2000:])
            assert "RunFolderBusy" in err and f"in use by pid {holder.pid}" in err, (name, err[-2000:])
        assert {d: _tree_hash(run / d) for d in ("data", "tokenized")} == before
        assert not (run / "sweep").exists() and not (run / "eval").exists() and not (run / "hub").exists()
    finally:
        _kill(holder)
        for p in locals().get("others", {}).values():
            _kill(p)


def test_two_preps_and_an_eval_during_a_prep(tmp_path):
    """A second `orpo prep` and an `orpo eval` started while a prep holds the folder exit 1 naming
    it (no FileNotFoundError from a deleted staging folder); the first prep completes, its data and
    tokenized files agree (same pairs), and no staging folder is left."""
    recipe = _recipe(tmp_path, n_rows=40000)
    run = tmp_path / "run"
    first = _orpo(tmp_path, "prep", str(recipe))
    try:
        wait_for(lambda: _owner_pid(run) == first.pid, timeout_s=120, interval_s=0.2, what="the first prep's lock")
        second = _orpo(tmp_path, "prep", str(recipe), "--set", "data.test_size=0.2")
        ev = _orpo(tmp_path, "eval", str(recipe))
        rc2, err2 = _finish(second)
        rc3, err3 = _finish(ev)
        still_running = first.poll() is None
        rc1, err1 = _finish(first)
    finally:
        _kill(first)
    assert still_running, "the first prep ended before the others tried: make it longer"
    assert rc1 == 0, err1[-2000:]
    for rc, err in ((rc2, err2), (rc3, err3)):
        assert rc == 1 and f"in use by pid {first.pid}" in err and "FileNotFoundError" not in err, err[-2000:]
    stats = json.loads((run / "tokenized" / "stats.json").read_text())
    for split in ("train", "test"):
        n_data = pq.read_metadata(run / "data" / f"{split}.parquet").num_rows
        assert stats["tokenization"][split]["rows_in"] == n_data  # tokenized from this data version
    assert stats["settings"]["test_size"] == 0.1  # the first prep's version, not the second's
    assert _leftovers(run) == []


def test_kill_9_during_tokenize_then_rerun_leaves_no_staging(tmp_path):
    """kill -9 while tokenizing leaves `.tokenized.tmp-<pid>@<host>-…`; the rerun removes it (its
    owner is dead) but keeps staging folders of a live process and of another host."""
    recipe = _recipe(tmp_path, n_rows=40000)
    run = tmp_path / "run"
    p = _orpo(tmp_path, "prep", str(recipe))
    try:
        staging = wait_for(lambda: [s for s in run.glob(".tokenized.tmp-*")] if run.is_dir() else None,
                           timeout_s=240, interval_s=0.1, what="tokenize staging folder")
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        _kill(p)
    assert [s.name.startswith(f".tokenized.tmp-{p.pid}@") for s in staging] == [True]
    assert staging[0].is_dir()
    # a live owner (a process of this test) and another host's folder must survive the rerun
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        kept = [run / f".data.tmp-{live.pid}@{os.uname().nodename}-0123abcd", run / ".tokenized.tmp-1@other-host-0123abcd"]
        for k in kept:
            k.mkdir()
        rc, err = _finish(_orpo(tmp_path, "prep", str(recipe), "--set", "data.sources.0.synthetic.n_rows=300"))
        assert rc == 0, err[-2000:]
        assert _leftovers(run) == sorted(k.name for k in kept)
    finally:
        _kill(live)
    assert (run / "tokenized" / "stats.json").is_file()

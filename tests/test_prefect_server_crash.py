"""`orpo run` as a user runs it, in subprocesses: one run per folder (lock), and crash cleanup
(the temporary server dies with a SIGKILLed `orpo run`; the rerun marks the run Crashed and resumes)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from prefect_server import ROOT, clean_env, wait_for
from tiny_recipe import tiny_recipe, write_recipe

pytestmark = [pytest.mark.slow, pytest.mark.server]


def _recipe(tmp_path: Path, max_steps: int) -> Path:
    return write_recipe(tmp_path / "recipe.yaml", tiny_recipe(
        "crash", tmp_path / "run", seed=3,
        train={"learning_rate": 1e-3, "max_steps": max_steps, "per_device_train_batch_size": 4, "logging_steps": 10,
               "save_steps": 2, "eval_steps": 100000},
        eval={"bootstrap_samples": 20, "max_new_tokens": 2, "n_prompts": 1},
    ))


def _orpo_run(recipe: Path, env: dict[str, str], log: Path, *extra: str) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "run", str(recipe), *extra],
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )


def _checkpoints(run: Path) -> list[Path]:
    d = run / "train" / "checkpoints"
    return sorted(d.glob("checkpoint-*")) if d.is_dir() else []


def _files(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def test_second_run_on_a_live_folder_fails_fast_and_deletes_nothing(prefect_server, tmp_path):
    """Two `orpo run` of one recipe and folder (the second with another beta): the second fails at
    once naming the lock and the holder, nothing under the first is deleted."""
    recipe = _recipe(tmp_path, max_steps=100000)  # killed below, never finishes
    run = tmp_path / "run"
    env = prefect_server.env()
    first = _orpo_run(recipe, env, tmp_path / "first.log")
    try:
        wait_for(lambda: len(_checkpoints(run)) >= 1 or first.poll() is not None, 300, 0.2, "the first run's first checkpoint")
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        before = _files(run / "train" / "checkpoints")
        owner = json.loads((run / ".orpo-run.json").read_text())
        assert owner["pid"] == first.pid and owner["flow_run_id"]
        t0 = time.monotonic()
        second = subprocess.run(
            [sys.executable, "-m", "flows.cli", "run", str(recipe), "--set", "orpo.beta=0.5"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        took = time.monotonic() - t0
        print(f"second run refused in {took:.1f} s")
        out = second.stdout + second.stderr
        assert second.returncode == 1, out
        assert f"run folder {run} is in use by pid {first.pid}" in out and ".orpo-run.lock" in out, out
        assert "removing checkpoints" not in out
        assert first.poll() is None  # the first run is untouched and still training
        after = _files(run / "train" / "checkpoints")
        assert before <= after or _checkpoints(run), (before, after)  # checkpoints only accumulate (rotation aside)
        assert _checkpoints(run)
    finally:
        _kill(first)


def _server_children(pid: int) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if "uvicorn" in " ".join(p.cmdline())]
    except psutil.NoSuchProcess:
        return []


def test_sigkill_leaves_no_server_and_rerun_marks_crashed_and_resumes(tmp_path):
    """`kill -9` of `orpo run` during training: its temporary Prefect server exits too; the rerun
    marks the abandoned flow run Crashed, resumes from the checkpoint and completes."""
    recipe = _recipe(tmp_path, max_steps=40)
    run = tmp_path / "run"
    home = tmp_path / "prefect-home"
    env = clean_env(home)  # no PREFECT_API_URL: `orpo run` starts its temporary server
    first = _orpo_run(recipe, env, tmp_path / "first.log")
    try:
        servers = wait_for(lambda: _server_children(first.pid), 120, 0.2, "the temporary server process")
        wait_for(lambda: _checkpoints(run) or first.poll() is not None, 300, 0.1, "the first checkpoint")
        assert first.poll() is None, "training finished before it could be killed: " + (tmp_path / "first.log").read_text()[-2000:]
        owner = json.loads((run / ".orpo-run.json").read_text())
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        t0 = time.monotonic()
        gone, alive = psutil.wait_procs(servers, timeout=20)
        print(f"temporary server gone {time.monotonic() - t0:.1f} s after SIGKILL")
        assert not alive, [p.cmdline() for p in alive]
    finally:
        _kill(first)
    ckpt_step = max(int(p.name.split("-")[1]) for p in _checkpoints(run))
    rerun = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(recipe)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-4000:]
    stamp = json.loads((run / "train" / ".stage.json").read_text())
    assert stamp["result"]["resumed"] is True and stamp["result"]["metrics"]["global_step"] == 40 and ckpt_step >= 2
    assert "was abandoned: marked Crashed" in rerun.stdout + rerun.stderr
    db = sqlite3.connect(home / "prefect.db")
    try:
        (state,) = db.execute("select state_type from flow_run where id = ?", (owner["flow_run_id"],)).fetchone()
    finally:
        db.close()
    assert state == "CRASHED"
    assert not (run / ".orpo-run.json").exists()  # a clean exit leaves no owner record

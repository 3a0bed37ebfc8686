"""``orpo sweep --fan-out`` on a real Prefect server with a process work pool and 2 workers.

Starts ``prefect server start`` (temporary PREFECT_HOME, free loopback port), creates a
process work pool, deploys :func:`flows.pipeline.orpo_pipeline` to it and starts two
``prefect worker start --limit 1`` workers (one flow run each at a time). A 2-point grid of
the smoke recipe then runs as two pipeline flow runs, one per worker, and the sweep table
is complete. A second grid with a point that fails (fp16 on CPU) reports it in the table
next to the point that succeeded. Every step is bounded by a timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from tiny_recipe import tiny_recipe, write_recipe

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
POOL = "fanout-test"
DEPLOYMENT = "orpo-pipeline/fanout-point"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefect() -> str:
    exe = BIN / "prefect"
    return str(exe) if exe.exists() else (shutil.which("prefect") or "prefect")


def _stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    from orpo_core.training.launch import stop_process_group

    stop_process_group(proc, grace_s=grace)


def _wait_for(pred, timeout: float, what: str, logs: list[Path] = ()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.5)
    tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A real server, a process pool with the pipeline deployed, and 2 workers (w1, w2)."""
    home = tmp_path_factory.mktemp("fanout-prefect")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "results"),
        "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage"),
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_WORKER_HEARTBEAT_SECONDS": "10",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "ORPO_RETRIES": "0",
        "ORPO_PIPELINE_DEPLOYMENT": DEPLOYMENT,
    }
    env.pop("PREFECT_API_KEY", None)
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []

    def start(name: str, cmd: list[str]) -> Path:
        log = home / f"{name}.log"
        logs.append(log)
        procs.append(subprocess.Popen(cmd, env=env, cwd=str(ROOT), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
        return log

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        start("server", [_prefect(), "server", "start", "--host", "127.0.0.1", "--port", str(port)])
        _wait_for(healthy, 120, "the Prefect server", logs)
        subprocess.run([_prefect(), "work-pool", "create", POOL, "--type", "process"], env=env, cwd=str(ROOT),
                       check=True, timeout=120, capture_output=True)
        deploy = (
            "from flows.pipeline import orpo_pipeline\n"
            f"orpo_pipeline.to_deployment(name='fanout-point', job_variables={{'working_dir': {str(ROOT)!r}}})"
            f".apply(work_pool_name={POOL!r})\n"
        )
        subprocess.run([sys.executable, "-c", deploy], env=env, cwd=str(ROOT), check=True, timeout=180, capture_output=True)
        worker_logs = [start(w, [_prefect(), "worker", "start", "--pool", POOL, "--name", w, "--limit", "1"]) for w in ("w1", "w2")]
        _wait_for(lambda: all("started!" in p.read_text(errors="replace") for p in worker_logs), 180, "2 workers", logs)
        yield {"env": env, "home": home, "logs": logs}
    finally:
        for p in reversed(procs):
            _stop(p)


def _smoke(tmp_path: Path) -> Path:
    return write_recipe(tmp_path / "smoke.yaml", tiny_recipe(
        "fanout", tmp_path / "run", n_rows=60, orpo={"beta": 0.1},
        train={"learning_rate": 1e-3, "max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1},
        eval={"bootstrap_samples": 20, "max_new_tokens": 2, "n_prompts": 1, "max_pairs": 8},
        hub={"repo_id": "someone/fanout-tiny"},
    ))


def _sweep(pool, recipe: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "flows.cli", "sweep", str(recipe), *args, "--fan-out"]
    return subprocess.run(cmd, env=pool["env"], cwd=str(ROOT), capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_fan_out_runs_each_point_on_its_own_worker_and_collects_the_table(pool, tmp_path):
    recipe = _smoke(tmp_path)
    proc = _sweep(pool, recipe, "--grid", "orpo.beta=0.05,0.2")
    assert proc.returncode == 0, proc.stderr[-6000:]
    sweep_dir = tmp_path / "run" / "sweep"
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    assert summary["fan_out"] == DEPLOYMENT
    rows = {r["point"]: r for r in summary["points"]}
    assert set(rows) == {"b0.05", "b0.2"}
    for point, row in rows.items():
        assert row["status"] == "ok" and row["flow_run_state"] == "Completed", row
        assert 0.0 <= row["preference/accuracy"] <= 1.0
        ev = json.loads((sweep_dir / point / "eval" / "eval.json").read_text())
        assert row["preference/accuracy"] == pytest.approx(ev["results"]["trained"]["preference/accuracy"])
        assert (sweep_dir / point / "train" / "model" / "model.safetensors").is_file()
    # both workers were free (limit 1 each): one point each
    assert {rows["b0.05"]["worker"], rows["b0.2"]["worker"]} == {"w1", "w2"}
    assert rows["b0.05"]["flow_run"] != rows["b0.2"]["flow_run"]
    md = (sweep_dir / "sweep.md").read_text()
    assert "| beta=0.05 |" in md and "| beta=0.2 |" in md and "w1" in md and "w2" in md
    assert (sweep_dir / "sweep.png").stat().st_size > 1000
    assert summary["base"] and "preference/accuracy" in summary["base"]  # scored once, in the first point


@pytest.mark.slow
def test_fan_out_reports_a_failed_point_and_keeps_the_others(pool, tmp_path):
    recipe = _smoke(tmp_path)
    proc = _sweep(pool, recipe, "--grid", "train.precision=fp32,fp16", "--set", "train.max_steps=1")
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "1 of 2 sweep points failed: pfp16" in proc.stderr.replace("\n", " ")
    summary = json.loads((tmp_path / "run" / "sweep" / "sweep.json").read_text())
    rows = {r["point"]: r for r in summary["points"]}
    assert rows["pfp32"]["status"] == "ok" and 0.0 <= rows["pfp32"]["preference/accuracy"] <= 1.0
    assert rows["pfp16"]["flow_run_state"] == "Failed"
    assert rows["pfp16"]["status"].startswith("flow run Failed") and "fp16" in rows["pfp16"]["status"]
    md = (tmp_path / "run" / "sweep" / "sweep.md").read_text()
    assert "| precision=fp32 |" in md and "| precision=fp16 |" in md

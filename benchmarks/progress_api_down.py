"""Step time of training while the Prefect server is killed and restarted (issue 22, item 3).

Starts a real ``prefect server start`` (tests/prefect_server.py: own PREFECT_HOME, free port),
runs a real flow whose task drives :class:`tasks.progress.PrefectProgressCallback` the way the
Trainer does (``on_train_begin``, ``on_step_end`` after each step, ``on_train_end``), with an
update at every step (``min_interval_s=0``, the worst case). A step is a fixed CPU workload
(``--step-ms`` of float32 matmuls, calibrated first). After ``--kill-at`` steps the server's
process group gets SIGKILL; after ``--restart-at`` steps it is started again on the same port
and database (in a thread: training does not wait for it). Prints the median and max step time
of each phase (server up / down / back) and the ratio to the "up" median, plus the sender's
counters, as JSON (``--json``) or a table.

    nice -n 5 PYTHONPATH=$PWD .venv/bin/python benchmarks/progress_api_down.py --steps 60 --kill-at 15 --restart-at 35

Before issue 22 each update called the Prefect client synchronously: with the server down a step
took 73-80 s (client retries); the acceptance bound is 1.2x a normal step.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _workload(step_ms: float):
    """A CPU step of about ``step_ms`` milliseconds (matmuls on 256x256 float32), calibrated once."""
    import torch

    torch.set_num_threads(1)
    a = torch.randn(256, 256)

    def one(n: int) -> None:
        x = a
        for _ in range(n):
            x = torch.tanh(x @ a) * 0.5

    t0 = time.perf_counter()
    one(20)
    per = (time.perf_counter() - t0) / 20
    n = max(1, int(step_ms / 1000.0 / per))
    return lambda: one(n)


def _read_progress(artifact_id) -> float | None:
    """The progress value the server holds for ``artifact_id`` (None when unreadable)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId

    if artifact_id is None:
        return None
    try:
        with get_client(sync_client=True) as client:
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[artifact_id])))
    except Exception:  # noqa: BLE001 - reported as None
        return None
    return float(arts[0].data) if arts else None


def run(steps: int = 60, kill_at: int = 15, restart_at: int = 35, step_ms: float = 150.0, send_timeout_s: float = 2.0) -> dict:
    """Run the scenario; returns ``{"phases": {name: {"n", "median_s", "max_s", "ratio"}}, "sender": {...}}``.

    Raises:
        RuntimeError: the server does not start (log tail in the message).
    """
    from tests.prefect_server import PrefectServer

    tmp = Path(tempfile.mkdtemp(prefix="orpo-progress-bench-"))
    server = PrefectServer(tmp / "home", tmp / "server.log").start()
    os.environ.update({k: v for k, v in server.env().items() if k.startswith("PREFECT_")})
    step = _workload(step_ms)
    times: list[float] = []
    phase_of: list[str] = []
    counters: dict = {}

    from prefect import flow, task

    from tasks.progress import PrefectProgressCallback
    from tasks.logs import run_logger

    @task(name="fake-train", persist_result=False)
    def fake_train() -> dict:
        cb = PrefectProgressCallback("progress-bench", "progress bench", run_logger(), min_interval_s=0.0,
                                     send_timeout_s=send_timeout_s)
        state = SimpleNamespace(global_step=0, max_steps=steps, epoch=0.0)
        cb.on_train_begin(None, state, None)
        restarter = None
        phase = "up"
        for i in range(steps):
            if i == kill_at:
                os.killpg(server.proc.pid, signal.SIGKILL)
                server.proc.wait()
                phase = "down"
            if i == restart_at:
                restarter = threading.Thread(target=server.start, daemon=True)
                restarter.start()
                phase = "restarting"
            t0 = time.perf_counter()
            step()
            state.global_step, state.epoch = i + 1, (i + 1) / steps
            cb.on_step_end(None, state, None)
            if i % 5 == 0:
                cb.on_log(None, state, None, logs={"loss": 1.0 / (i + 1)})
            times.append(time.perf_counter() - t0)
            if phase == "restarting" and restarter is not None and not restarter.is_alive():
                phase = "back"
            phase_of.append(phase)
        if restarter is not None:
            restarter.join(180)
        t0 = time.perf_counter()
        cb.on_train_end(None, state, None)
        s = cb.sender
        counters.update(sent=s.sent, failed=s.failed, superseded=s.superseded, dropped=s.dropped,
                        train_end_s=round(time.perf_counter() - t0, 3), artifact_id=str(s.artifact_id))
        counters["final_progress"] = _read_progress(s.artifact_id)
        return {}

    @flow(name="progress-bench", persist_result=False)
    def bench_flow() -> None:
        fake_train()

    try:
        with server.settings():
            bench_flow()
    finally:
        server.stop()
    up = statistics.median([t for t, p in zip(times, phase_of) if p == "up"][1:] or times)
    phases = {}
    for name in ("up", "down", "restarting", "back"):
        ts = [t for t, p in zip(times, phase_of) if p == name]
        if ts:
            med = statistics.median(ts)
            phases[name] = {"n": len(ts), "median_s": round(med, 4), "max_s": round(max(ts), 4), "ratio": round(med / up, 3),
                            "max_ratio": round(max(ts) / up, 3)}
    return {"steps": steps, "kill_at": kill_at, "restart_at": restart_at, "step_ms": step_ms, "phases": phases, "sender": counters,
            "load_avg": os.getloadavg()}


def main() -> None:  # pragma: no cover - CLI
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--kill-at", type=int, default=15)
    ap.add_argument("--restart-at", type=int, default=35)
    ap.add_argument("--step-ms", type=float, default=150.0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    res = run(a.steps, a.kill_at, a.restart_at, a.step_ms)
    if a.json:
        print(json.dumps(res, indent=2))
        return
    print(f"| phase | steps | median step (s) | max step (s) | median / up | max / up |\n|---|---|---|---|---|---|")
    for name, p in res["phases"].items():
        print(f"| {name} | {p['n']} | {p['median_s']} | {p['max_s']} | {p['ratio']} | {p['max_ratio']} |")
    print(f"\nsender: {res['sender']}; load average {res['load_avg']}")


if __name__ == "__main__":  # pragma: no cover
    main()

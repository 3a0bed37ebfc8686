"""Screenshots of the Prefect UI after real runs: evidence for what a user sees (issue 23).

Starts a temporary ``prefect server start`` (its own PREFECT_HOME, a free port, the UI on, and
``PREFECT_UI_API_URL`` pointing the UI at that port: without it the UI calls port 4200), runs
the quickstart recipe twice (the second run all Cached) and a 2-point beta sweep against it with
the ``orpo`` CLI, then takes headless Chromium screenshots of the second run's page, its
Artifacts tab and the artifacts (run summary, evaluation, sample answers, model card, sweep
report). Nothing is written into the repository: run outputs and PNGs go to ``--out``.

    python benchmarks/ui_screenshots.py --out /tmp/orpo_ui_shots --max-steps 10

Needs ``chromium`` on PATH (``apt-get install -y chromium``). Takes ~15 min on a loaded 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.prefect_server import clean_env, free_port  # noqa: E402


def api(url: str, path: str, body: dict | None = None):
    """POST ``body`` (or GET) to the server's REST API; the JSON answer."""
    req = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"}, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def shoot(chromium: str, url: str, path: Path, height: int = 1800) -> None:
    """A full-window PNG of ``url`` after the page's scripts settled (virtual time budget)."""
    subprocess.run(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size=1600,{height}",
         "--virtual-time-budget=60000", f"--screenshot={path}", url],
        check=False, capture_output=True, timeout=180,
    )
    print(f"{path}: {'ok' if path.is_file() else 'MISSING'} <- {url}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/orpo_ui_shots")
    ap.add_argument("--max-steps", type=int, default=10)
    ap.add_argument("--skip-runs", action="store_true", help="only screenshots (server home kept in --out)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        print("chromium not found: apt-get install -y chromium", file=sys.stderr)
        return 2
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    home = out / "prefect_home"
    server_env = clean_env(home, {"PREFECT_UI_API_URL": url, "PREFECT_SERVER_UI_ENABLED": "true"})
    log = open(out / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=server_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError((out / "server.log").read_text()[-3000:]) from None
                time.sleep(1)
        ui_settings = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=10).read())
        print("UI calls the API at", ui_settings.get("api_url"), flush=True)
        env = clean_env(home, {"PREFECT_API_URL": url, "PREFECT_UI_URL": f"http://127.0.0.1:{port}"})
        over = ["-s", f"output_dir={out / 'runs' / 'quickstart'}", "-s", f"train.max_steps={args.max_steps}",
                "-s", "train.eval_steps=5", "-s", "train.logging_steps=2", "-s", "eval.bootstrap_samples=300"]
        cli = [sys.executable, "-m", "flows.cli"]
        steps = [
            ("run1", [*cli, "run", "recipes/quickstart.yaml", *over]),
            ("run2", [*cli, "run", "recipes/quickstart.yaml", *over]),
            ("sweep", [*cli, "sweep", "recipes/quickstart.yaml", "-g", "orpo.beta=0.05,0.2", *over]),
        ]
        for name, cmd in steps:
            t0 = time.monotonic()
            with open(out / f"{name}.log", "wb") as f:
                rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
            print(f"{name}: rc {rc} in {time.monotonic() - t0:.0f} s", flush=True)
        runs = api(url, "/flow_runs/filter", {"sort": "START_TIME_ASC", "limit": 20})
        for fr in runs:
            print("flow run", fr["name"], fr["state"]["name"] if fr.get("state") else None, fr["tags"], flush=True)
        pipeline = [fr for fr in runs if "flow=pipeline" in fr["tags"]]
        sweep = [fr for fr in runs if "flow=sweep" in fr["tags"]]
        second = pipeline[1] if len(pipeline) > 1 else pipeline[-1]
        arts = api(url, "/artifacts/filter", {"sort": "CREATED_DESC", "limit": 200})
        by_key: dict[str, dict] = {}
        for a in arts:
            if a.get("key") and a["key"] not in by_key:
                by_key[a["key"]] = a
        for k, a in sorted(by_key.items()):
            print(f"artifact {k}: {a['type']}, {len(str(a.get('data') or ''))} chars, flow run {a.get('flow_run_id')}", flush=True)
        base = f"http://127.0.0.1:{port}"
        shoot(chromium, f"{base}/runs/flow-run/{second['id']}", out / "01_cached_run.png")
        shoot(chromium, f"{base}/runs/flow-run/{second['id']}?tab=Artifacts", out / "02_cached_run_artifacts.png")
        for i, key in enumerate(["quickstart-summary", "quickstart-eval-results", "quickstart-eval-samples",
                                 "quickstart-model-card", "quickstart-sweep", "quickstart-data-stats",
                                 "quickstart-tokenization-stats", "quickstart-train-metrics"], start=3):
            if key in by_key:
                shoot(chromium, f"{base}/artifacts/artifact/{by_key[key]['id']}", out / f"{i:02d}_{key}.png", height=2400)
        if sweep:
            shoot(chromium, f"{base}/runs/flow-run/{sweep[-1]['id']}", out / "11_sweep_run.png")
        shoot(chromium, f"{base}/runs", out / "12_runs_list.png")
    finally:
        import os
        import signal

        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=20)
        except Exception:  # noqa: BLE001
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Screenshots of the Prefect UI after real runs: evidence for what a user sees (issue 23).

Starts a temporary ``prefect server start`` (its own PREFECT_HOME, a free port, the UI on, and
``PREFECT_UI_API_URL`` pointing the UI at that port: without it the UI calls port 4200), runs
the quickstart recipe twice (the second run all Cached), a 2-point beta sweep, and a training
killed with SIGKILL mid-train followed by a new run (which marks the killed run Crashed and its
progress artifact), all with the ``orpo`` CLI. Then headless Chromium, driven over the DevTools
protocol, takes screenshots of the second run's page and Artifacts tab (the tab is clicked: the UI
resets a ``?tab=`` link while the run loads), its cached train task run (Cache Key), every
artifact (full length), the sweep run, the killed run's progress artifact and the runs list.
Nothing is written into the repository: run outputs and PNGs go to ``--out``.

    python benchmarks/ui_screenshots.py --out /tmp/orpo_ui_shots --max-steps 10

``--skip-runs`` only takes the screenshots again, from the server home left in ``--out``.
Needs ``chromium`` on PATH (``apt-get install -y chromium``). Takes ~10-15 min on a loaded 2-core CPU.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import signal
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


class Browser:
    """One headless Chromium driven over the DevTools protocol (``websockets``, a Prefect dependency).

    ``shoot`` loads a page at 1600 px wide, waits for the UI's requests to settle, optionally
    clicks a tab by its label, and writes a PNG of ``height`` pixels (the UI scrolls inside its
    own layout, so a tall page needs a tall window)."""

    def __init__(self, chromium: str, profile: Path):
        port = free_port()
        self.proc = subprocess.Popen(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--remote-debugging-port={port}",
             f"--user-data-dir={profile}", "--window-size=1600,1800", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2).read())
                page = next(t for t in targets if t.get("type") == "page")
                break
            except (OSError, StopIteration, ValueError):
                if time.monotonic() > deadline:
                    raise RuntimeError("chromium's DevTools endpoint did not come up") from None
                time.sleep(0.5)
        from websockets.sync.client import connect

        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.next_id = 0

    def cdp(self, method: str, **params):
        """Send one DevTools command and return its result (events in between are skipped)."""
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=120))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expr: str):
        return self.cdp("Runtime.evaluate", expression=expr, returnByValue=True).get("result", {}).get("value")

    def shoot(self, url: str, path: Path, height: int = 1800, click: str | None = None, settle_s: float = 6.0) -> None:
        self.cdp("Emulation.setDeviceMetricsOverride", width=1600, height=height, deviceScaleFactor=1, mobile=False)
        self.cdp("Page.navigate", url=url)
        time.sleep(settle_s)
        if click:
            found = self.js(
                "(() => { const el = [...document.querySelectorAll('button, [role=tab], a, li')]"
                f".find(e => e.textContent.trim() === {json.dumps(click)}); if (el) {{ el.click(); return true }} return false }})()"
            )
            print(f"  clicked {click!r}: {found}", flush=True)
            time.sleep(settle_s)
        data = self.cdp("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        print(f"{path}: {path.stat().st_size} bytes <- {url}", flush=True)

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def wait_for_training_step(url: str, key: str, known_runs: set[str], min_step: int, timeout_s: float) -> dict:
    """The progress artifact ``key`` of a flow run not in ``known_runs`` once its table shows
    ``step >= min_step`` (TimeoutError after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for a in api(url, "/artifacts/filter", {"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 5}):
            m = re.search(r"\|\s*step\s*\|\s*(\d+)", a.get("description") or "")
            if a.get("flow_run_id") and a["flow_run_id"] not in known_runs and m and int(m.group(1)) >= min_step:
                return a
        time.sleep(1)
    raise TimeoutError(f"no new {key} artifact reached step {min_step} in {timeout_s:.0f} s")


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
        for name, cmd in steps if not args.skip_runs else []:
            t0 = time.monotonic()
            with open(out / f"{name}.log", "wb") as f:
                rc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
            print(f"{name}: rc {rc} in {time.monotonic() - t0:.0f} s", flush=True)
        if not args.skip_runs:
            # a training killed with SIGKILL mid-train (its own output folder, more steps), then a new run there
            known = {fr["id"] for fr in api(url, "/flow_runs/filter", {"limit": 50})}
            killed_over = [*over, "-s", f"output_dir={out / 'runs' / 'killed'}", "-s", f"train.max_steps={4 * args.max_steps}"]
            t0 = time.monotonic()
            with open(out / "killed.log", "wb") as f:
                proc = subprocess.Popen([*cli, "run", "recipes/quickstart.yaml", *killed_over], cwd=ROOT, env=env, stdout=f,
                                        stderr=subprocess.STDOUT, start_new_session=True)
                try:
                    art = wait_for_training_step(url, "quickstart-training-progress", known, 3, timeout_s=900)
                finally:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=60)
            print(f"killed: SIGKILL at {time.monotonic() - t0:.0f} s, progress artifact {art['id']} of flow run {art['flow_run_id']}", flush=True)
            t0 = time.monotonic()
            with open(out / "after_kill.log", "wb") as f:
                rc = subprocess.run([*cli, "run", "recipes/quickstart.yaml", *killed_over], check=False, cwd=ROOT, env=env, stdout=f,
                                    stderr=subprocess.STDOUT).returncode
            print(f"after_kill: rc {rc} in {time.monotonic() - t0:.0f} s", flush=True)
        runs = api(url, "/flow_runs/filter", {"sort": "START_TIME_ASC", "limit": 50})
        for fr in runs:
            print("flow run", fr["name"], fr["state"]["name"] if fr.get("state") else None, fr["tags"], flush=True)
        pipeline = [fr for fr in runs if "flow=pipeline" in fr["tags"]]
        sweep = [fr for fr in runs if "flow=sweep" in fr["tags"]]
        crashed = [fr for fr in runs if fr.get("state") and fr["state"]["name"] == "Crashed"]
        second = pipeline[1] if len(pipeline) > 1 else pipeline[-1]
        arts = api(url, "/artifacts/filter", {"sort": "CREATED_DESC", "limit": 200})
        by_key: dict[str, dict] = {}  # per key: the cached (second) run's artifact, else the latest
        for a in arts:
            if a.get("key") and (a["key"] not in by_key or (a.get("flow_run_id") == second["id"] != by_key[a["key"]].get("flow_run_id"))):
                by_key[a["key"]] = a
        for k, a in sorted(by_key.items()):
            print(f"artifact {k}: {a['type']}, {len(str(a.get('data') or ''))} chars, flow run {a.get('flow_run_id')}", flush=True)
        tasks_of_second = api(url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [second["id"]]}}})
        for tr in tasks_of_second:
            print(f"task run {tr['name']}: {tr['state']['name'] if tr.get('state') else None}, cache_key {tr.get('cache_key')}", flush=True)
        base = f"http://127.0.0.1:{port}"
        browser = Browser(chromium, out / "chromium_profile")
        try:
            browser.shoot(f"{base}/runs/flow-run/{second['id']}", out / "01_cached_run.png")
            browser.shoot(f"{base}/runs/flow-run/{second['id']}", out / "02_cached_run_artifacts.png", height=2400, click="Artifacts")
            train = [tr for tr in tasks_of_second if tr["name"].startswith("train")]
            if train:
                browser.shoot(f"{base}/runs/task-run/{train[0]['id']}", out / "02b_cached_train_task.png", click="Details")
            heights = {"quickstart-model-card": 7000, "quickstart-eval-results": 4000, "quickstart-summary": 2600,
                       "quickstart-sweep": 3000, "quickstart-train-metrics": 3000}
            for i, key in enumerate(["quickstart-summary", "quickstart-eval-results", "quickstart-eval-samples",
                                     "quickstart-model-card", "quickstart-sweep", "quickstart-data-stats",
                                     "quickstart-tokenization-stats", "quickstart-train-metrics"], start=3):
                if key in by_key:
                    browser.shoot(f"{base}/artifacts/artifact/{by_key[key]['id']}", out / f"{i:02d}_{key}.png", height=heights.get(key, 2000))
            if sweep:
                browser.shoot(f"{base}/runs/flow-run/{sweep[-1]['id']}", out / "11_sweep_run.png")
                browser.shoot(f"{base}/runs/flow-run/{sweep[-1]['id']}", out / "11b_sweep_task_runs.png", click="Task Runs")
            for fr in crashed[:1]:
                prog = api(url, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [fr["id"]]}, "type": {"any_": ["progress"]}}})
                for a in prog[:1]:
                    print(f"progress artifact of crashed run {fr['name']}: {a.get('data')} %, description starts {(a.get('description') or '')[:80]!r}", flush=True)
                    browser.shoot(f"{base}/artifacts/artifact/{a['id']}", out / "13_crashed_progress.png")
                browser.shoot(f"{base}/runs/flow-run/{fr['id']}", out / "14_crashed_run.png", click="Artifacts")
            browser.shoot(f"{base}/runs", out / "12_runs_list.png")
        finally:
            browser.close()
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=20)
        except Exception:  # noqa: BLE001
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Against a real ``prefect server start`` (one per session, tests/prefect_server.py): the deployment
commands of docs/orchestration.md, the server's scheduler, and a process worker running the pipeline.

Tests in this module run in file order: the deployments registered by the first one are used by
the later ones (each still checks what it needs).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from prefect_server import ROOT, prefect_cli, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.server]

ORCHESTRATION_DOC = ROOT / "docs" / "orchestration.md"


def readme_server_commands() -> list[str]:
    """The shell lines of the "real server with workers" block of docs/orchestration.md (comments stripped)."""
    text = ORCHESTRATION_DOC.read_text()
    start = text.index("To run on a real server with workers")
    block = text[start:].split("```bash", 1)[1].split("```", 1)[0]
    lines = []
    for line in block.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line:
            lines.append(line)
    return lines


def prefect_yaml_deployments(path: Path = ROOT / "prefect.yaml") -> list[dict]:
    return yaml.safe_load(path.read_text())["deployments"]


def _deployments(server) -> dict[str, object]:
    from prefect.client.orchestration import get_client

    with server.settings(), get_client(sync_client=True) as client:
        return {d.name: d for d in client.read_deployments()}


@pytest.fixture(scope="module")
def deployed(prefect_server):
    """Run exactly docs/orchestration.md's pool and deploy commands against the server; returns the deploy result."""
    cmds = readme_server_commands()
    pools = [c for c in cmds if c.startswith("prefect work-pool create")]
    deploys = [c for c in cmds if c.startswith("prefect ") and " deploy " in f"{c} "]
    assert len(pools) == 2 and len(deploys) == 1, cmds
    env = prefect_server.env()
    env.pop("ORPO_PROJECT_DIR", None)  # unset when deploying (as docs/orchestration.md recommends): the worker's value is read later
    t0 = time.monotonic()
    for c in pools:
        r = subprocess.run([sys.executable, "-m", *shlex.split(c)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", *shlex.split(deploys[0])], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    print(f"docs pool + deploy commands: {time.monotonic() - t0:.1f} s")
    return r


def test_readme_deploy_all_registers_every_deployment(prefect_server, deployed):
    out = deployed.stdout + deployed.stderr
    assert deployed.returncode == 0, out
    assert "Would you like" not in out  # no interactive prompt
    expected = {d["name"] for d in prefect_yaml_deployments()}
    assert {"orpo-pipeline-gpu", "orpo-data-cpu", "orpo-sweep-alpha-beta", "orpo-retrain-weekly"} <= expected
    got = _deployments(prefect_server)
    assert expected <= set(got), (expected - set(got), out[-3000:])
    # the optional Kubernetes deployment is not part of --all
    assert "orpo-pipeline-k8s" not in got
    # ORPO_PROJECT_DIR unset at deploy time: the template survives and each worker resolves it
    pull = got["orpo-pipeline-gpu"].pull_steps
    assert pull == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $ORPO_PROJECT_DIR }}"}}]
    assert got["orpo-retrain-weekly"].work_pool_name == "gpu-process"
    assert got["orpo-data-cpu"].work_pool_name == "cpu-process"


def test_scheduler_creates_retrain_runs(prefect_server, deployed):
    """The retrain deployment with a short cron gets runs from the server's scheduler service
    (fails with SQLAlchemy 2.1: `Can't evaluate bulk DML statement`)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    # a pool without workers, so nothing executes the scheduled runs
    r = prefect_cli(prefect_server, "work-pool", "create", "schedule-test", "--type", "process")
    assert r.returncode == 0, r.stdout + r.stderr
    r = prefect_cli(prefect_server, "deploy", "-n", "orpo-retrain-weekly", "--cron", "*/5 * * * *", "--pool", "schedule-test", timeout_s=300)
    assert r.returncode == 0, r.stdout + r.stderr
    dep = _deployments(prefect_server)["orpo-retrain-weekly"]
    assert "*/5 * * * *" in [s.schedule.cron for s in dep.schedules]

    def scheduled():
        with prefect_server.settings(), get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
            )
        soon = [fr for fr in runs if fr.expected_start_time < datetime.now(timezone.utc) + timedelta(minutes=16)]
        return soon if len(soon) >= 3 else None

    t0 = time.monotonic()
    runs = wait_for(scheduled, timeout_s=90, interval_s=1, what=f"3 scheduled runs (server log:\n{prefect_server.log_tail()})")
    print(f"scheduler created {len(runs)} runs in {time.monotonic() - t0:.1f} s")
    times = sorted(fr.expected_start_time for fr in runs)
    assert all(t.minute % 5 == 0 and t.second == 0 for t in times)
    assert all(fr.auto_scheduled for fr in runs)
    assert "bulk DML" not in prefect_server.log_tail(100_000)


def smoke_overrides(out_dir: Path) -> list[str]:
    """recipes/quickstart.yaml shrunk to seconds: a 1-layer tiny model, 160 rows, 3 steps."""
    return [
        f"output_dir={out_dir}",
        "model.tiny.hidden_size=32",
        "model.tiny.intermediate_size=64",
        "model.tiny.num_hidden_layers=1",
        "data.sources.0.synthetic.n_rows=160",
        "train.max_steps=3",
        "train.logging_steps=1",
        "train.save_steps=2",
        "train.eval_steps=2",
        "eval.bootstrap_samples=50",
        "eval.max_new_tokens=4",
    ]


def _flow_run(server, flow_run_id):
    from prefect.client.orchestration import get_client

    with server.settings(), get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def _task_states(server, flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with server.settings(), get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {tr.name.rsplit("-", 1)[0]: tr.state.name for tr in runs}


def _run_deployment_via_cli(server, out_dir: Path) -> str:
    """`prefect deployment run` as in docs/orchestration.md (+ smoke overrides); returns the flow run id."""
    r = prefect_cli(
        server,
        "deployment",
        "run",
        "orpo-pipeline/orpo-pipeline-gpu",
        "-p",
        "recipe=recipes/quickstart.yaml",
        "-p",
        "overrides=" + json.dumps(smoke_overrides(out_dir)),
        timeout_s=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"UUID:\s*([0-9a-f-]{36})", r.stdout)
    assert m, r.stdout
    return m.group(1)


def test_process_worker_runs_pipeline_then_cached(prefect_server, deployed, tmp_path):
    """A `prefect worker start --pool gpu-process` (docs/orchestration.md) runs the pipeline deployment to Completed;
    a second run of the same parameters finds every stage Cached; the worker console shows each
    project log line once."""
    import os
    import signal

    out_dir = tmp_path / "smoke"
    log_path = tmp_path / "worker.log"
    env = prefect_server.env(ORPO_PROJECT_DIR=str(ROOT), PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="5")
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "gpu-process"],
            cwd=tmp_path,  # the pull step, not the worker's cwd, must put the run in the project
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        t0 = time.monotonic()
        states = []
        for attempt in range(2):
            fid = _run_deployment_via_cli(prefect_server, out_dir)

            def final():
                fr = _flow_run(prefect_server, fid)
                return fr if fr.state and fr.state.is_final() else None

            fr = wait_for(final, timeout_s=600, interval_s=2, what=f"flow run {fid} (worker log:\n{log_path.read_text()[-4000:]})")
            assert fr.state.is_completed(), (fr.state, log_path.read_text()[-6000:])

            def settled():  # task run states reach the API as events, shortly after the flow run ends
                st = _task_states(prefect_server, fid)
                done = {"prepare", "tokenize", "train", "evaluate"} <= set(st) and all(v in ("Completed", "Cached", "Failed", "Crashed") for v in st.values())
                return st if done else None

            states.append(wait_for(settled, 60, 1, f"final task run states of {fid}"))
            print(f"worker run {attempt + 1}: {time.monotonic() - t0:.1f} s, {states[-1]}")
        stages = ("prepare", "tokenize", "train", "evaluate")
        assert [states[0][s] for s in stages] == ["Completed"] * 4
        assert [states[1][s] for s in stages] == ["Cached"] * 4
        assert json.loads((out_dir / "train" / "metrics.json").read_text())["global_step"] == 3
        assert (out_dir / "eval" / "eval.json").is_file()
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=30)
    console = log_path.read_text(errors="replace")
    # one console line per log record: the train stage's summary line appears once (first run only)
    finished = [line for line in console.splitlines() if "train finished in" in line]
    assert len(finished) == 1, "\n".join(finished)
    trainer_lines = [line for line in console.splitlines() if "***** Running training *****" in line]
    assert len(trainer_lines) == 1, "\n".join(trainer_lines)


def _pairs(path: Path, n: int, offset: int = 0) -> None:
    rows = [
        {"prompt": f"What is {a} + {a + 3}?", "chosen": str(2 * a + 3), "rejected": str(2 * a + 4)}
        for a in range(offset, offset + n)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_retrain_over_two_data_versions(prefect_server, tmp_path, monkeypatch):
    """The retrain flow against the real server (real tiny stages): v1 trains and publishes (first
    publication), v1 again is skipped before any stage, v2 (new rows) trains and evaluates and the
    gate decides; every decision lands in decisions.jsonl and the decision artifact."""
    from types import SimpleNamespace

    import orpo_core.publish.hub as hub
    from flows.retrain import retrain
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    uploads = []

    class FakeApi:  # the Hub is not reachable from tests: record the upload instead
        def create_repo(self, *a, **k):
            pass

        def upload_folder(self, **kw):
            uploads.append(sorted(p.name for p in Path(kw["folder_path"]).iterdir()))
            return SimpleNamespace(commit_url=f"https://huggingface.co/t/retrain/commit/{len(uploads)}")

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # uploads are faked: not refused as offline
    monkeypatch.setattr(hub, "read_published_metrics", lambda *a, **k: None)
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 30)
    data = tmp_path / "pairs.jsonl"
    _pairs(data, 60)
    recipe = tmp_path / "retrain.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "run_name": "retrain-test",
                "output_dir": str(tmp_path / "run"),
                "seed": 5,
                "model": {"name_or_path": "tiny", "dtype": "float32", "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}},
                "data": {"sources": [{"path": str(data), "format": "standard"}], "test_size": 0.25, "max_length": 64, "max_prompt_length": 48},
                "train": {"learning_rate": 1e-3, "max_steps": 3, "per_device_train_batch_size": 8, "logging_steps": 1},
                "eval": {"bootstrap_samples": 20, "max_new_tokens": 2, "n_prompts": 1},
                "hub": {"repo_id": "t/retrain", "push": True},
            }
        )
    )
    t0 = time.monotonic()
    with prefect_server.settings():
        v1 = retrain(recipe=str(recipe))
        n1 = len(uploads)
        t1 = time.monotonic()
        same = retrain(recipe=str(recipe))
        n2 = len(uploads)
        t2 = time.monotonic()
        _pairs(data, 90, offset=100)  # data version 2
        v2 = retrain(recipe=str(recipe))
        t3 = time.monotonic()
        with get_client(sync_client=True) as client:
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["retrain-test-retrain-decision"])))
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()  # ship the runs' logs while the server is up
    print(f"retrain v1 {t1 - t0:.1f} s, unchanged {t2 - t1:.1f} s, v2 {t3 - t2:.1f} s")
    assert v1["action"] == "published" and v1["gate"]["previous"] is None and n1 == 1
    assert "model.safetensors" in uploads[0] and "README.md" in uploads[0]
    assert set(v1["stages"]) >= {"prepare", "tokenize", "train", "evaluate", "last_published", "push"}
    assert same["action"] == "skipped" and same["stages"] == {} and n2 == 1
    assert v2["data"]["fingerprint"] != v1["data"]["fingerprint"]
    assert (v2["stages"]["prepare"], v2["stages"]["train"], v2["stages"]["evaluate"]) == ("Completed", "Completed", "Completed")
    assert v2["gate"]["previous"] == v1["gate"]["new"] and v2["gate"]["previous_source"] == "record"
    # published exactly when the gate says so
    assert v2["action"] == ("published" if v2["gate"]["new"] > v2["gate"]["previous"] else "kept")
    assert len(uploads) == (2 if v2["action"] == "published" else 1)
    lines = [json.loads(x) for x in (tmp_path / "run" / "retrain" / "decisions.jsonl").read_text().splitlines()]
    assert [x["action"] for x in lines] == ["published", "skipped", v2["action"]]
    assert all(x["flow_run_id"] for x in lines)
    md = [a.data for a in sorted(arts, key=lambda a: a.created)]
    assert len(md) == 3 and "| decision | **skipped** |" in md[1] and f"| decision | **{v2['action']}** |" in md[2]

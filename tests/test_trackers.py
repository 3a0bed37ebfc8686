"""train.report_to: [tensorboard, mlflow, trackio] log offline, to local stores, and the logged
series are read back from each store (TRL metric names); the evaluation's metrics join the same
runs. Training and the evaluation logging run as real `orpo` / python processes (the trackers'
settings are process-wide environment variables)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("tensorboard", reason="tracker tests need the [trackers] extra (pip install '.[trackers]')")
pytest.importorskip("mlflow", reason="tracker tests need the [trackers] extra (pip install '.[trackers]')")
if __import__("importlib").util.find_spec("trackio") is None:
    pytest.skip("tracker tests need the [trackers] extra (pip install '.[trackers]')", allow_module_level=True)

TRL_NAMES = ("rewards/accuracies", "log_odds_ratio", "nll_loss", "rewards/margins")


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trackers")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRACKIO_DIR": str(tmp / "trackio-store"), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("TENSORBOARD_LOGGING_DIR", None)
    sets = [
        f"output_dir={tmp / 'run'}", "run_name=tracked", "data.sources.0.synthetic.n_rows=120",
        "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.num_hidden_layers=2",
        "train.max_steps=4", "train.logging_steps=2", "train.eval_steps=4", "train.save_steps=null",
        "train.per_device_train_batch_size=4", "train.report_to=[tensorboard, mlflow, trackio]",
    ]
    args = [a for s in sets for a in ("--set", s)]
    _run(["-m", "flows.cli", "prep", "recipes/quickstart.yaml", *args], env)
    _run(["-m", "flows.cli", "train", "recipes/quickstart.yaml", *args], env)
    train_dir = tmp / "run" / "train"
    # the evaluate task's call, in its own process as in the pipeline
    _run(["-c", "import sys; from orpo_core.training.trackers import log_evaluation_metrics as f; "
          f"print(f({str(train_dir)!r}, {{'preference/accuracy': 0.75, 'preference/margin': 0.125}}))"], env)
    return train_dir, json.loads((train_dir / "trackers.json").read_text(encoding="utf-8"))


def test_trackers_json_and_metrics_link_the_runs(trained):
    train_dir, runs = trained
    assert set(runs) == {"tensorboard", "mlflow", "trackio"}
    assert runs["tensorboard"]["logdir"] == str((train_dir / "tracking" / "tensorboard").resolve())
    assert runs["mlflow"]["tracking_uri"] == f"sqlite:///{(train_dir / 'tracking' / 'mlflow.db').resolve()}"
    assert runs["mlflow"]["run_uri"].endswith(runs["mlflow"]["run_id"])
    assert Path(runs["trackio"]["db"]).is_file() and runs["trackio"]["project"] == "tracked"
    metrics = json.loads((train_dir / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["trackers"] == runs
    from orpo_core.training.trackers import tracker_markdown

    md = tracker_markdown(runs)
    assert runs["mlflow"]["run_uri"] in md and runs["tensorboard"]["logdir"] in md


def test_tensorboard_series(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_dir, runs = trained
    scalars: dict[str, list] = {}
    for ev in runs["tensorboard"]["event_files"] + [str(p) for p in Path(runs["tensorboard"]["logdir"]).rglob("events.out.tfevents.*")]:
        acc = EventAccumulator(ev)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    for name in TRL_NAMES:
        assert len({s for s, _ in scalars[f"train/{name}"]}) >= 2, name  # logged at steps 1, 2, 4
        assert f"eval/{name}" in scalars
    assert scalars["evaluation/preference/accuracy"] == [(4, 0.75)]


def test_mlflow_series(trained):
    from mlflow.tracking import MlflowClient

    _, runs = trained
    client = MlflowClient(tracking_uri=runs["mlflow"]["tracking_uri"])
    rid = runs["mlflow"]["run_id"]
    for name in TRL_NAMES:
        hist = client.get_metric_history(rid, name)
        assert len({m.step for m in hist}) >= 2, name
        assert client.get_metric_history(rid, f"eval_{name}")
    acc = client.get_metric_history(rid, "evaluation/preference/accuracy")
    assert [(m.step, m.value) for m in acc] == [(4, 0.75)]
    assert client.get_run(rid).data.params.get("learning_rate") is not None


def test_trackio_series(trained):
    _, runs = trained
    con = sqlite3.connect(runs["trackio"]["db"])
    tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
    assert "metrics" in tables, tables
    rows = con.execute("select step, metrics from metrics where run_name = ?", (runs["trackio"]["run"],)).fetchall()
    logged: dict[str, list] = {}
    for step, blob in rows:
        for k, v in json.loads(blob).items():
            logged.setdefault(k, []).append((step, v))
    for name in TRL_NAMES:
        assert len({s for s, _ in logged[f"train/{name}"]}) >= 2, (name, sorted(logged))
    assert logged["evaluation/preference/accuracy"] == [(4, 0.75)]

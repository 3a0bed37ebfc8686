"""Experiment trackers (``train.report_to``) that log offline, to stores under the run folder.

``train.report_to`` is handed to the Trainer (transformers' callbacks). This module makes each
supported tracker write locally, without a server or an account, and records where:

* ``tensorboard``: event files in ``<run>/train/tracking/tensorboard`` (``TENSORBOARD_LOGGING_DIR``
  for transformers' ``TensorBoardCallback``; needs the ``tensorboard`` package);
* ``mlflow``: a local SQLite store ``<run>/train/tracking/mlflow.db``
  (``MLFLOW_TRACKING_URI=sqlite:///...``; artifacts in ``tracking/mlartifacts``), experiment =
  ``run_name`` (``MLFLOW_EXPERIMENT_NAME``), unless the environment already names a tracking URI /
  experiment (then those are used and recorded). Not the ``file:`` store: MLflow 3.17 refuses it
  ("filesystem tracking backend ... is in maintenance mode", unless ``MLFLOW_ALLOW_FILE_STORE``);
* ``trackio``: local-first SQLite store, project = ``run_name``, no Space (``trackio_space_id``
  None, ``trackio_static_space_id`` False). Its folder is trackio's ``TRACKIO_DIR`` (environment
  variable read when trackio is imported; default ``$HF_HOME/trackio``), not the run folder:
  trackio fixes it per process.

The Trainer logs TRL's metric names (``rewards/accuracies``, ``log_odds_ratio``, ``nll_loss``,
...; TensorBoard prefixes ``train/`` / ``eval/``). After training :func:`record_tracker_runs`
writes ``<run>/train/trackers.json`` (the run of each tracker: log folder, MLflow run id and
URI, trackio project / run / database), which the Prefect train task shows as an artifact, and
:func:`log_evaluation_metrics` adds the evaluation's metrics (``evaluation/<metric>``, e.g.
``evaluation/preference/accuracy``) to the same runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

logger = logging.getLogger(__name__)

SUPPORTED = ("tensorboard", "mlflow", "trackio")
TRACKERS_FILE = "trackers.json"
EVAL_PREFIX = "evaluation/"


def tracking_dir(train_dir: str | Path) -> Path:
    """``<train_dir>/tracking``: where the offline stores of a run go."""
    return Path(train_dir) / "tracking"


def training_args_kwargs(report_to: list[str], run_name: str) -> dict[str, Any]:
    """Extra ``TrainingArguments`` for the trackers in ``report_to``: ``run_name`` always; for
    trackio ``project`` = run name and no Hub Space (``trackio_space_id=None``,
    ``trackio_static_space_id=False``)."""
    kw: dict[str, Any] = {"run_name": run_name}
    if "trackio" in report_to:
        kw.update(project=run_name, trackio_space_id=None, trackio_static_space_id=False)
    return kw


@contextlib.contextmanager
def offline_tracking_env(report_to: list[str], train_dir: str | Path, run_name: str) -> Iterator[dict[str, str]]:
    """Set the environment variables that send tensorboard / mlflow to local stores under
    ``train_dir/tracking`` for the block (variables already set by the user are kept); restores
    the previous values after. Yields the variables in force."""
    base = tracking_dir(train_dir)
    wanted: dict[str, str] = {}
    if "tensorboard" in report_to:
        wanted["TENSORBOARD_LOGGING_DIR"] = str((base / "tensorboard").resolve())
    if "mlflow" in report_to:
        wanted["MLFLOW_TRACKING_URI"] = f"sqlite:///{(base / 'mlflow.db').resolve()}"
        wanted["MLFLOW_EXPERIMENT_NAME"] = run_name
    saved = {k: os.environ.get(k) for k in wanted}
    in_force = {}
    for k, v in wanted.items():
        if not os.environ.get(k):
            os.environ[k] = v
        in_force[k] = os.environ[k]
    if in_force:
        base.mkdir(parents=True, exist_ok=True)
    if "mlflow" in report_to and in_force["MLFLOW_TRACKING_URI"] == wanted["MLFLOW_TRACKING_URI"]:
        _ensure_mlflow_experiment(in_force["MLFLOW_TRACKING_URI"], in_force["MLFLOW_EXPERIMENT_NAME"], base / "mlartifacts")
    try:
        yield in_force
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _ensure_mlflow_experiment(tracking_uri: str, name: str, artifacts: Path) -> None:
    """Create the experiment with its artifact folder under the run folder (MLflow's default,
    ``./mlruns`` of the working directory, would put files in the current folder)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(name, artifact_location=artifacts.resolve().as_uri())


def _mlflow_run(tracking_uri: str, experiment: str, run_name: str) -> dict[str, Any] | None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"attributes.run_name = '{run_name}'", order_by=["attributes.start_time DESC"], max_results=1
    )
    if not runs:
        return None
    run = runs[0]
    return {
        "tracking_uri": tracking_uri,
        "experiment": experiment,
        "experiment_id": exp.experiment_id,
        "run_id": run.info.run_id,
        "run_uri": f"{tracking_uri}#/experiments/{exp.experiment_id}/runs/{run.info.run_id}",
        "ui": f"mlflow ui --backend-store-uri {tracking_uri}",
    }


def record_tracker_runs(report_to: list[str], train_dir: str | Path, run_name: str, env: Mapping[str, str]) -> dict[str, Any]:
    """Write ``train_dir/trackers.json``: where each tracker of ``report_to`` logged this run.

    Returns:
        ``{"tensorboard": {"logdir", "event_files", "ui"}, "mlflow": {"tracking_uri", "experiment",
        "experiment_id", "run_id", "run_uri", "ui"}, "trackio": {"project", "run", "db", "ui"}}``
        for the trackers used; a tracker whose run cannot be found gets ``{"error": ...}``.
    """
    out: dict[str, Any] = {}
    if "tensorboard" in report_to and env.get("TENSORBOARD_LOGGING_DIR"):
        logdir = Path(env["TENSORBOARD_LOGGING_DIR"])
        events = sorted(str(p) for p in logdir.rglob("events.out.tfevents.*"))
        out["tensorboard"] = {"logdir": str(logdir), "event_files": events, "ui": f"tensorboard --logdir {logdir}"}
    if "mlflow" in report_to and env.get("MLFLOW_TRACKING_URI"):
        try:
            out["mlflow"] = _mlflow_run(env["MLFLOW_TRACKING_URI"], env.get("MLFLOW_EXPERIMENT_NAME") or run_name, run_name) or {
                "error": "no MLflow run found"
            }
        except Exception as e:  # noqa: BLE001 - bookkeeping must not fail a finished training
            out["mlflow"] = {"error": f"{type(e).__name__}: {e}"}
    if "trackio" in report_to:
        try:
            from trackio.sqlite_storage import SQLiteStorage

            out["trackio"] = {
                "project": run_name,
                "run": run_name,
                "db": str(SQLiteStorage.get_project_db_path(run_name)),
                "ui": f"trackio show --project {run_name}",
            }
        except Exception as e:  # noqa: BLE001
            out["trackio"] = {"error": f"{type(e).__name__}: {e}"}
    if out:
        path = Path(train_dir) / TRACKERS_FILE
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(out, indent=2), encoding="utf-8")
        os.replace(tmp, path)
    return out


def read_tracker_runs(train_dir: str | Path) -> dict[str, Any]:
    """``train_dir/trackers.json`` ({} when training reported to no tracker)."""
    p = Path(train_dir) / TRACKERS_FILE
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def tracker_markdown(runs: Mapping[str, Any]) -> str:
    """A markdown table ``| tracker | run | open with |`` of :func:`record_tracker_runs`' result ("" when empty)."""
    rows = []
    for name, r in runs.items():
        if "error" in r:
            rows.append(f"| {name} | not found: {r['error']} | |")
            continue
        where = {"tensorboard": r.get("logdir"), "mlflow": r.get("run_uri"), "trackio": f"{r.get('db')} (run {r.get('run')})"}.get(name)
        rows.append(f"| {name} | `{where}` | `{r.get('ui', '')}` |")
    if not rows:
        return ""
    return "\n".join(["| tracker | run | open with |", "|---|---|---|", *rows])


def log_evaluation_metrics(train_dir: str | Path, metrics: Mapping[str, float], step: int | None = None) -> list[str]:
    """Log evaluation metrics (``{name: value}``) as ``evaluation/<name>`` to the tracker runs of
    ``train_dir/trackers.json`` (TensorBoard: a new event file in the same log folder; MLflow:
    the same run id; trackio: the same project and run, resumed).

    Args:
        step: the step the values are logged at (default: the run's last training step, from
            ``train_dir/metrics.json`` ``global_step`` when present, else 0).

    Returns:
        the trackers written to (failures are logged as warnings, never raised: the evaluation
        result does not depend on them).
    """
    runs = read_tracker_runs(train_dir)
    values = {f"{EVAL_PREFIX}{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    if not runs or not values:
        return []
    if step is None:
        try:
            step = int(json.loads((Path(train_dir) / "metrics.json").read_text(encoding="utf-8")).get("global_step", 0))
        except (OSError, ValueError, TypeError):
            step = 0
    done: list[str] = []
    tb = runs.get("tensorboard") or {}
    if tb.get("logdir"):
        try:
            from torch.utils.tensorboard import SummaryWriter

            with contextlib.closing(SummaryWriter(log_dir=tb["logdir"])) as w:
                for k, v in values.items():
                    w.add_scalar(k, v, step)
            done.append("tensorboard")
        except Exception as e:  # noqa: BLE001
            logger.warning("could not log the evaluation to TensorBoard: %s", e)
    ml = runs.get("mlflow") or {}
    if ml.get("run_id"):
        try:
            import time

            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient

            now = int(time.time() * 1000)
            MlflowClient(tracking_uri=ml["tracking_uri"]).log_batch(
                ml["run_id"], metrics=[Metric(k, v, now, step) for k, v in values.items()]
            )
            done.append("mlflow")
        except Exception as e:  # noqa: BLE001
            logger.warning("could not log the evaluation to MLflow run %s: %s", ml.get("run_id"), e)
    tr = runs.get("trackio") or {}
    if tr.get("project"):
        try:
            import trackio

            trackio.init(project=tr["project"], name=tr["run"], resume="must", space_id=None)
            trackio.log(values, step=step)
            trackio.finish()
            done.append("trackio")
        except Exception as e:  # noqa: BLE001
            logger.warning("could not log the evaluation to trackio project %s: %s", tr.get("project"), e)
    return done

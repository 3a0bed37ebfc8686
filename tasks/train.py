"""Prefect task: ORPO training (``orpo_core.train.run_training``).

Retries resume from the latest checkpoint: ``run_training(resume=True)`` is
used when the checkpoints in ``out_dir/checkpoints`` were written under the same
configuration (same cache base key, recorded in ``.stage-inprogress.json`` when
training starts, or in the previous stamp). Checkpoints left by another
configuration (same run folder, different ``orpo.beta`` or data) are deleted
first, so a new configuration never resumes from an old one — but never those of
a live run: flows hold the run-folder lock (:mod:`tasks.run_lock`), and the
marker's pid is checked as well.

Retries (:func:`tasks.common.retry_if_transient`) only for network errors, HTTP
429/5xx and CUDA out-of-memory; a permission error, a missing file or a bad
recipe fails at once.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from prefect import task

from .caching import INPROGRESS_NAME, read_stamp, stage_base_key
from .run_lock import RunFolderBusy
from .common import (
    artifact_key,
    cached_task_options,
    json_safe,
    load_recipe_dict,
    make_progress_callback,
    markdown_artifact,
    run_logger,
    stage_run,
    stats_rows,
    table_artifact,
)


def _live_writer(marker: dict) -> int | None:
    """The pid of another live process on this host that is training into the folder, else None."""
    pid = marker.get("pid")
    if not pid or pid == os.getpid() or marker.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return int(pid)
    return int(pid)


def _resume_decision(out_dir: Path, base_key: str) -> bool:
    """True when existing checkpoints belong to this configuration; stale ones are removed,
    unless another live process is still training into the folder (then RunFolderBusy: the
    run-folder lock normally prevents this; this guards direct task use)."""
    ckpt = out_dir / "checkpoints"
    marker_path = out_dir / INPROGRESS_NAME
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        marker = {}
    same = marker.get("base_key") == base_key
    stamp = read_stamp(out_dir)
    same = same or bool(stamp and stamp.get("base_key") == base_key)
    if ckpt.is_dir() and any(ckpt.iterdir()) and not same:
        pid = _live_writer(marker)
        if pid is not None:
            raise RunFolderBusy(f"{out_dir} is being trained by live process {pid}: its checkpoints in {ckpt} are left alone")
        run_logger().warning("removing checkpoints of another configuration in %s", ckpt)
        shutil.rmtree(ckpt)
    return same


@task(**cached_task_options("train"), description="Train with ORPO; retries resume from the latest checkpoint.")
def train_task(recipe: dict[str, Any], tokenized_dir: str, out_dir: str) -> dict[str, Any]:
    """Train on ``tokenized_dir`` into ``out_dir`` (``<run>/train``).

    A progress artifact (``<run>-training-progress``) follows ``global_step / max_steps``
    and the Trainer's log dicts go to the run logs. With ``train.report_to``, a markdown artifact
    (``<run>-tracker-runs``) links each tracker's run (:mod:`orpo_core.trackers`). With ``train.distributed`` asking for
    several processes, :func:`orpo_core.distributed.train_distributed` runs ``accelerate
    launch`` and streams every rank's output lines to the run logs.

    Returns:
        ``{"stage": "train", "path": out_dir, "model_dir": out_dir/model,
        "log_history": out_dir/log_history.json, "metrics": <metrics.json>, "content_hash": ...}``.
        Cached on the tokenized data's content, the model/orpo/train/peft sections, the seed
        and the code version.
    """
    from orpo_core.distributed import train_distributed, uses_launcher
    from orpo_core.train import run_training

    r = load_recipe_dict(recipe)
    r.require_model()
    out = Path(out_dir)
    inputs = {"recipe": recipe, "tokenized_dir": tokenized_dir, "out_dir": out_dir}
    base_key = stage_base_key("train", inputs)
    out.mkdir(parents=True, exist_ok=True)
    resume = _resume_decision(out, base_key)
    (out / INPROGRESS_NAME).write_text(json.dumps({"base_key": base_key, "pid": os.getpid(), "host": socket.gethostname()}), encoding="utf-8")
    cb = make_progress_callback(artifact_key(r.run_name, "training-progress"), f"Training progress of {r.run_name}")
    with stage_run("train", inputs) as box:
        if uses_launcher(r.train.distributed):  # train.distributed: accelerate launch, lines to the run log
            metrics = train_distributed(r, Path(tokenized_dir), out, resume=resume, callbacks=[cb] if cb else None, line_logger=run_logger())
        else:
            metrics = run_training(r, Path(tokenized_dir), out, resume=resume, callbacks=[cb] if cb else None)
        (out / INPROGRESS_NAME).unlink(missing_ok=True)
        box["result"] = {
            "stage": "train",
            "path": str(out),
            "model_dir": str(out / "model"),
            "log_history": str(out / "log_history.json"),
            "metrics": json_safe(metrics),
            "resumed": resume,
        }
    table_artifact(stats_rows(metrics or {}), artifact_key(r.run_name, "train-metrics"), f"Final training metrics of {r.run_name}")
    if r.train.report_to:  # link each tracker's run (train/trackers.json)
        from orpo_core.trackers import read_tracker_runs, tracker_markdown

        md = tracker_markdown(read_tracker_runs(out))
        if md:
            markdown_artifact(md, artifact_key(r.run_name, "tracker-runs"), f"Experiment-tracker runs of {r.run_name}")
    return {**box["result"], "content_hash": box["content_hash"]}

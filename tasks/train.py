"""Prefect task: ORPO training (``orpo_core.training.run.run_training``).

Retries resume from the latest checkpoint when the checkpoints in ``out_dir/checkpoints`` were
written under the same configuration; checkpoints of another configuration are deleted first —
the decision of :func:`orpo_core.runs.resume.resume_decision`, which ``orpo train`` takes too.

Retries (:func:`tasks.options.retry_if_transient`) only for network errors, HTTP
429/5xx and CUDA out-of-memory; a permission error, a missing file or a bad
recipe fails at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from orpo_core.io import json_safe
from orpo_core.runs.cache import stage_base_key
from orpo_core.runs.resume import resume_decision, training_marker
from .artifacts import markdown_artifact

from .artifacts import artifact_key, table_artifact, with_point
from .logs import run_logger
from .options import cached_task_options, load_recipe_dict
from .progress import make_progress_callback
from .stage import stage_run


@task(**cached_task_options("train"), description="Train with ORPO; retries resume from the latest checkpoint.")
def train_task(recipe: dict[str, Any], tokenized_dir: str, out_dir: str) -> dict[str, Any]:
    """Train on ``tokenized_dir`` into ``out_dir`` (``<run>/train``).

    A progress artifact (``<run>-training-progress``) follows ``global_step / max_steps``
    and the Trainer's log dicts go to the run logs. With ``train.report_to``, a markdown artifact
    (``<run>-tracker-runs``) links each tracker's run (:mod:`orpo_core.training.trackers`). With ``train.distributed`` asking for
    several processes, :func:`orpo_core.training.launch.train_distributed` runs ``accelerate
    launch`` and streams every rank's output lines to the run logs.

    Returns:
        ``{"stage": "train", "path": out_dir, "model_dir": out_dir/model,
        "log_history": out_dir/log_history.json, "metrics": <metrics.json>, "content_hash": ...}``.
        Cached on the tokenized data's content, the model/orpo/train/peft sections, the seed
        and the code version.
    """
    from orpo_core.training.launch import train_distributed, uses_launcher
    from orpo_core.training.run import run_training

    r = load_recipe_dict(recipe)
    r.require_model()
    out = Path(out_dir)
    inputs = {"recipe": recipe, "tokenized_dir": tokenized_dir, "out_dir": out_dir}
    base_key = stage_base_key("train", inputs)
    resume = resume_decision(out, base_key, log=run_logger())
    cb = make_progress_callback(artifact_key(r.run_name, "training-progress"), with_point(f"Training progress of {r.run_name}"))
    with training_marker(out, base_key), stage_run("train", inputs) as box:
        try:
            if uses_launcher(r.train.distributed):  # train.distributed: accelerate launch, lines to the run log
                metrics = train_distributed(r, Path(tokenized_dir), out, resume=resume, callbacks=[cb] if cb else None, line_logger=run_logger())
            else:
                metrics = run_training(r, Path(tokenized_dir), out, resume=resume, callbacks=[cb] if cb else None)
        finally:
            if cb is not None:  # a failed training never reached on_train_end: stop its progress sender
                cb.close(flush_timeout_s=2.0)
        box["result"] = {
            "stage": "train",
            "path": str(out),
            "model_dir": str(out / "model"),
            "log_history": str(out / "log_history.json"),
            "metrics": json_safe(metrics),
            "resumed": resume,
        }
    from .ui import train_metrics_rows

    table_artifact(train_metrics_rows(metrics), artifact_key(r.run_name, "train-metrics"), f"Final training metrics of {r.run_name}")
    if r.train.report_to:  # link each tracker's run (train/trackers.json)
        from orpo_core.training.trackers import read_tracker_runs, tracker_markdown

        md = tracker_markdown(read_tracker_runs(out))
        if md:
            markdown_artifact(md, artifact_key(r.run_name, "tracker-runs"), f"Experiment-tracker runs of {r.run_name}")
    return {**box["result"], "content_hash": box["content_hash"]}

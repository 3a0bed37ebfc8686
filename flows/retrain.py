"""Scheduled retraining: rerun the pipeline on fresh data, publish only if the model improved.

``retrain(recipe)`` re-runs data preparation with the cache refreshed (new rows
in a local file or a new revision of an unpinned Hub dataset are picked up;
identical data leaves tokenize / train / evaluate cached, content-keyed), then
trains and evaluates, and compares the new model's ``eval.gate_metric`` with
the last published model's:

* the Hub model card's model-index of ``hub.repo_id`` when it can be read
  (authoritative: it is what users see), else
* the local record ``<run>/published.json`` written at each real upload.

The model is published (``push_task``, upload when ``hub.push``) only when it is
strictly better (``eval.gate_mode``: ``max`` = higher is better, ``min`` = lower),
or when nothing was published before. Deployed with a cron schedule in
``prefect.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from flows.pipeline import PUBLISHED_RECORD, eval_metrics, load, run_stage, write_published_record
from tasks import evaluate_task, last_published_task, prepare_task, push_task, tokenize_task, train_task
from tasks.common import json_safe, run_logger


def gate_decision(new: float | None, previous: float | None, mode: str = "max") -> tuple[bool, str]:
    """Whether a model with gate value ``new`` should replace one with ``previous``.

    Returns:
        (publish, reason). ``new`` None never publishes; ``previous`` None always does
        (first publication); otherwise strictly better in ``mode`` ("max" or "min").
    """
    if new is None:
        return False, "the new model has no value for the gate metric"
    if previous is None:
        return True, "nothing published before"
    better = new > previous if mode == "max" else new < previous
    if better:
        return True, f"new {new:.6g} beats published {previous:.6g} ({mode})"
    return False, f"new {new:.6g} does not beat published {previous:.6g} ({mode})"


@flow(name="orpo-retrain", description="Refresh data, retrain, evaluate; publish only if the gate metric improves.")
def retrain(recipe: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Retrain on fresh data and publish when better than the last published model.

    Returns:
        ``{"run_name", "stages", "gate": {"metric", "mode", "new", "previous", "previous_source",
        "publish", "reason"}, "push": {...} | None, "metrics": {...}}``.
    """
    r = load(recipe, overrides)
    r.require_model()
    d = r.to_dict()
    out = r.out_dir
    log = run_logger()
    states: dict[str, str] = {}
    prep = run_stage(prepare_task.with_options(refresh_cache=True), states, "prepare", recipe=d, out_dir=str(out / "data"))
    tok = run_stage(tokenize_task, states, "tokenize", recipe=d, data_dir=prep["path"], out_dir=str(out / "tokenized"))
    tr = run_stage(train_task, states, "train", recipe=d, tokenized_dir=tok["path"], out_dir=str(out / "train"))
    ev = run_stage(
        evaluate_task, states, "evaluate", recipe=d, model_dir=tr["model_dir"], tokenized_dir=tok["path"], out_dir=str(out / "eval")
    )
    metric, mode = r.eval.gate_metric, r.eval.gate_mode
    new = eval_metrics(ev["eval_json"]).get(metric)
    last = run_stage(last_published_task, states, "last_published", recipe=d, record_path=str(out / PUBLISHED_RECORD))
    previous = (last.get("metrics") or {}).get(metric)
    publish, reason = gate_decision(new, previous, mode)
    log.info("gate %s: %s -> %s", metric, reason, "publish" if publish else "keep the published model")
    gate = {
        "metric": metric,
        "mode": mode,
        "new": new,
        "previous": previous,
        "previous_source": last.get("source"),
        "publish": publish,
        "reason": reason,
    }
    push = None
    if publish:
        push = run_stage(
            push_task,
            states,
            "push",
            recipe=d,
            model_dir=tr["model_dir"],
            eval_json=ev["eval_json"],
            out_dir=str(out / "hub"),
            dry_run=not r.hub.push,
        )
        if push.get("pushed"):
            write_published_record(out, r, ev["eval_json"], push)
        else:
            gate["reason"] += "; hub.push is false: dry run only, nothing published"
    return json_safe(
        {
            "run_name": r.run_name,
            "out_dir": str(Path(out)),
            "stages": states,
            "gate": gate,
            "push": push,
            "metrics": eval_metrics(ev["eval_json"]),
        }
    )

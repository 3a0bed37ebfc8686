"""Scheduled retraining: retrain when the data changed, publish only if the model improved.

``retrain(recipe)`` runs under the run-folder lock (:func:`flows.pipeline.run_folder`) and:

1. fingerprints the inputs without preparing them (:func:`orpo_core.runs.data_version.data_version`:
   local files' content, a pinned Hub revision or the commit the Hub serves now, plus the
   resolved recipe) and compares with the last decision in ``<run>/retrain/decisions.jsonl``;
2. unchanged inputs (and the last run's model still on disk): records ``skipped`` and stops, no
   stage runs;
3. otherwise prepares the data again (cache refreshed), tokenizes, trains and evaluates (each
   content-keyed: identical prepared data leaves the later stages cached), and compares the new
   model's ``eval.gate_metric`` with the last published model's — the Hub model card's
   model-index of ``hub.repo_id`` when it can be read, else the local record
   ``<run>/published.json`` written at each real upload;
4. publishes (``push_task``, upload when ``hub.push``) only when the gate says so: strictly
   better in ``eval.gate_mode`` (``max``: higher is better, ``min``: lower), or nothing
   published before.

Every run appends its decision (``skipped``, ``published``, ``kept``, ``dry-run``) with the
data fingerprint, the gate values and the reason to ``<run>/retrain/decisions.jsonl``, writes
it to ``<run>/retrain/last_decision.json`` and shows it as the markdown artifact
``<run>-retrain-decision``. ``force=True`` retrains even on unchanged inputs. Deployed with a
cron schedule in ``prefect.yaml``.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow

from flows.runs import PUBLISHED_RECORD, eval_metrics, export_and_push, flow_run_namer, load, run_folder, run_stage, tag_flow_run
from tasks import evaluate_task, export_task, last_published_task, prepare_task, push_task, tokenize_task, train_task
from orpo_core.io import atomic_write_json, fmt_value, json_safe
from tasks.artifacts import artifact_key, markdown_artifact
from tasks.logs import run_logger


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


DECISIONS = "retrain/decisions.jsonl"
LAST_DECISION = "retrain/last_decision.json"


def read_last_decision(out_dir: str | Path) -> dict[str, Any] | None:
    """The last decision recorded under ``<run>/retrain`` (None when there is none or it is unreadable)."""
    try:
        return json.loads((Path(out_dir) / LAST_DECISION).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_decision(out_dir: str | Path, decision: dict[str, Any]) -> Path:
    """Append ``decision`` to ``<run>/retrain/decisions.jsonl`` and replace ``last_decision.json`` (atomic)."""
    out = Path(out_dir)
    path = out / DECISIONS
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(json_safe(decision), sort_keys=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
    atomic_write_json(out / LAST_DECISION, decision, sort_keys=True)
    return path


def decision_markdown(decision: dict[str, Any]) -> str:
    """The decision as a short markdown report (the ``<run>-retrain-decision`` artifact)."""
    gate = decision.get("gate") or {}
    rows = [
        ("decision", f"**{decision['action']}**"),
        ("reason", decision.get("reason", "")),
        ("data fingerprint", f"`{decision['data']['fingerprint'][:16]}`"),
        ("previous fingerprint", f"`{(decision.get('previous_data_fingerprint') or '-')[:16]}`"),
        ("sources", "<br>".join(f"`{s}`" for s in decision["data"]["sources"])),
    ]
    if gate:
        rows += [
            ("gate metric", f"`{gate.get('metric')}` ({gate.get('mode')})"),
            ("new model", fmt_value(gate.get("new"))),
            ("published model", f"{fmt_value(gate.get('previous'))} ({gate.get('previous_source') or 'none'})"),
        ]
    if decision.get("stages"):
        rows.append(("stages", ", ".join(f"{k}: {v}" for k, v in decision["stages"].items())))
    rows.append(("decided at", decision["at"]))
    body = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"# Retraining decision: {decision['action']}\n\n| | |\n|---|---|\n{body}\n"


@flow(name="orpo-retrain", flow_run_name=flow_run_namer("retrain"), description="Retrain when the data changed; publish only if the gate metric improves.")
def retrain(recipe: str, overrides: list[str] | None = None, force: bool = False) -> dict[str, Any]:
    """Retrain on new data and publish when better than the last published model (module docstring).

    Args:
        recipe: recipe YAML path; overrides: ``section.key=value`` list.
        force: retrain even when the data and recipe are unchanged since the last decision.

    Returns:
        ``{"run_name", "out_dir", "action": "skipped"|"published"|"kept"|"dry-run", "reason",
        "data": {"fingerprint", "sources"}, "stages", "gate": {...} | None, "push": {...} | None,
        "metrics": {...}, "decision_file"}``.

    Raises:
        orpo_core.runs.lock.RunFolderBusy: another live run holds the run folder.
    """
    r = load(recipe, overrides)
    r.require_model()
    out = r.out_dir
    tag_flow_run(f"recipe={r.run_name}", "flow=retrain")
    with run_folder(out):
        return _retrain(r, out, force)


def _retrain(r, out: Path, force: bool) -> dict[str, Any]:
    """The body of :func:`retrain`, run while holding the run folder."""
    from orpo_core.runs.data_version import data_version

    d = r.to_dict()
    log = run_logger()
    version = data_version(d)
    last = read_last_decision(out)
    previous_fp = (last or {}).get("data", {}).get("fingerprint")
    decision: dict[str, Any] = {
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "flow_run_id": _flow_run_id(),
        "data": version,
        "previous_data_fingerprint": previous_fp,
        "stages": {},
        "gate": None,
    }
    model_present = (out / "train" / "model").is_dir()
    result: dict[str, Any] = {"run_name": r.run_name, "out_dir": str(out), "data": version, "gate": None, "push": None, "metrics": {}}
    if not force and previous_fp == version["fingerprint"] and model_present:
        decision.update(action="skipped", reason=f"data and recipe unchanged since {last.get('at')} (last decision: {last.get('action')})")
        log.info("retrain skipped: %s", decision["reason"])
        return _finish(r, out, decision, result)

    states: dict[str, str] = decision["stages"]
    prep = run_stage(prepare_task.with_options(refresh_cache=True), states, "prepare", recipe=d, out_dir=str(out / "data"))
    tok = run_stage(tokenize_task, states, "tokenize", recipe=d, data_dir=prep["path"], out_dir=str(out / "tokenized"))
    tr = run_stage(train_task, states, "train", recipe=d, tokenized_dir=tok["path"], out_dir=str(out / "train"))
    ev = run_stage(
        evaluate_task, states, "evaluate", recipe=d, model_dir=tr["model_dir"], tokenized_dir=tok["path"], out_dir=str(out / "eval")
    )
    metric, mode = r.eval.gate_metric, r.eval.gate_mode
    new = eval_metrics(ev["eval_json"]).get(metric)
    last_pub = run_stage(last_published_task, states, "last_published", recipe=d, record_path=str(out / PUBLISHED_RECORD))
    previous = (last_pub.get("metrics") or {}).get(metric)
    publish, reason = gate_decision(new, previous, mode)
    log.info("gate %s: %s -> %s", metric, reason, "publish" if publish else "keep the published model")
    gate = {
        "metric": metric,
        "mode": mode,
        "new": new,
        "previous": previous,
        "previous_source": last_pub.get("source"),
        "publish": publish,
        "reason": reason,
    }
    push = None
    action = "kept"
    if publish:
        push, _ = export_and_push(states, r, d, out, tr["model_dir"], ev["eval_json"], dry_run=not r.hub.push,
                                  export_task=export_task, push_task=push_task)
        if push.get("pushed"):
            action = "published"
        else:
            action = "dry-run"
            gate["reason"] += "; hub.push is false: dry run only, nothing published"
    decision.update(action=action, reason=gate["reason"], gate=gate, model_content_hash=tr.get("content_hash"))
    result.update(gate=gate, push=push, metrics=eval_metrics(ev["eval_json"]))
    return _finish(r, out, decision, result)


def _finish(r, out: Path, decision: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    path = write_decision(out, decision)
    markdown_artifact(decision_markdown(decision), artifact_key(r.run_name, "retrain-decision"), f"Retraining decision of {r.run_name}")
    return json_safe({**result, "action": decision["action"], "reason": decision["reason"], "stages": decision["stages"], "decision_file": str(path)})


def _flow_run_id() -> str | None:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx is not None and ctx.flow_run is not None else None

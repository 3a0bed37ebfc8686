"""Prefect task: evaluation (``orpo_core.evaluation.run_evaluation``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task

from .caching import log_history_path
from .common import (
    artifact_key,
    cached_task_options,
    json_safe,
    load_recipe_dict,
    markdown_artifact,
    stage_run,
    table_artifact,
)


def eval_table_rows(eval_data: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows ``{metric, <model label>..., delta}`` of an eval.json for a table artifact."""
    from orpo_core.model_card import extract_metrics, pick_label

    metrics = extract_metrics(eval_data)
    trained = pick_label(metrics, "trained")
    base = pick_label(metrics, "base")
    if trained is None:
        return []
    rows = []
    for name, m in metrics[trained].items():
        row: dict[str, Any] = {"metric": name, trained: m.value}
        if m.ci:
            row["ci95"] = f"[{m.ci[0]:.4g}, {m.ci[1]:.4g}]"
        b = metrics[base].get(name) if base else None
        if b is not None:
            row[base] = b.value
            row["delta"] = m.value - b.value
        rows.append(row)
    return rows


def instruction_artifact_markdown(eval_data: dict[str, Any]) -> str:
    """The instruction-following section of eval.md (accuracies, paired delta, answers side by side)
    for a markdown artifact; empty when the evaluation has none."""
    from orpo_core.evaluation.report import instruction_markdown

    return "\n".join(instruction_markdown(eval_data)).strip()


@task(**cached_task_options("evaluate"), description="Preference metrics, perplexity and lm-eval tasks, base vs trained.")
def evaluate_task(
    recipe: dict[str, Any],
    model_dir: str,
    tokenized_dir: str,
    out_dir: str,
    compare_base: bool = True,
) -> dict[str, Any]:
    """Evaluate ``model_dir`` into ``out_dir`` (``<run>/eval``).

    The base model (``recipe.model`` resolved with ``orpo_core.tiny.resolve_model_path``
    under the run folder) is evaluated too when ``compare_base`` and ``eval.compare_base``.
    ``log_history.json`` next to the model folder feeds the training curves. With
    ``train.report_to``, the trained model's metrics are logged to the training's tracker runs
    (``train/trackers.json``, :func:`orpo_core.trackers.log_evaluation_metrics`).

    Returns:
        ``{"stage": "evaluate", "path": out_dir, "eval_json": ..., "eval_md": ...,
        "gate": {"metric", "value"}, "content_hash": ...}``. Cached on the model folder's and
        the tokenized data's content, the eval and model sections, the seed and the code version.
    """
    from orpo_core.evaluation import run_evaluation
    from orpo_core.model_card import metric_value
    from orpo_core.tiny import resolve_model_path

    r = load_recipe_dict(recipe)
    model = r.require_model()
    inputs = {
        "recipe": recipe,
        "model_dir": model_dir,
        "tokenized_dir": tokenized_dir,
        "out_dir": out_dir,
        "compare_base": compare_base,
    }
    log_history = log_history_path(model_dir)  # part of the cache key (tasks.caching)
    if not compare_base:
        r.eval.compare_base = False
    with stage_run("evaluate", inputs) as box:
        base_model = resolve_model_path(model, r.out_dir, seed=r.seed) if r.eval.compare_base else None
        run_evaluation(
            r,
            Path(model_dir),
            Path(tokenized_dir),
            Path(out_dir),
            base_model=base_model,
            log_history=log_history if log_history.is_file() else None,
        )
        eval_json = Path(out_dir) / "eval.json"
        data = json.loads(eval_json.read_text(encoding="utf-8"))
        if model.name_or_path and r.train.report_to:  # the evaluation joins the training's tracker runs
            from orpo_core.model_card import extract_metrics, pick_label
            from orpo_core.trackers import log_evaluation_metrics

            metrics = extract_metrics(data)
            label = pick_label(metrics, "trained")
            if label is not None:
                log_evaluation_metrics(Path(model_dir).parent, {k: m.value for k, m in metrics[label].items()})
        box["result"] = {
            "stage": "evaluate",
            "path": str(out_dir),
            "eval_json": str(eval_json),
            "eval_md": str(Path(out_dir) / "eval.md"),
            "gate": {"metric": r.eval.gate_metric, "value": metric_value(data, r.eval.gate_metric)},
        }
    table_artifact(eval_table_rows(data), artifact_key(r.run_name, "eval-results"), f"Evaluation of {r.run_name}")
    instructions_md = instruction_artifact_markdown(data)
    if instructions_md:
        markdown_artifact(
            instructions_md, artifact_key(r.run_name, "eval-instructions"), f"Instruction following of {r.run_name}"
        )
    return json_safe({**box["result"], "content_hash": box["content_hash"]})

"""Prefect task: evaluation (``orpo_core.evaluation.run_evaluation``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task

from orpo_core.runs.cache import log_history_path
from orpo_core.io import json_safe
from .artifacts import artifact_key, markdown_artifact
from .options import cached_task_options, load_recipe_dict
from .stage import stage_run


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

    The base model (``recipe.model`` resolved with ``orpo_core.models.sources.resolve_model_path``
    under the run folder) is evaluated too when ``compare_base`` and ``eval.compare_base``.
    ``log_history.json`` next to the model folder feeds the training curves. With
    ``train.report_to``, the trained model's metrics are logged to the training's tracker runs
    (``train/trackers.json``, :func:`orpo_core.training.trackers.log_evaluation_metrics`).

    Returns:
        ``{"stage": "evaluate", "path": out_dir, "eval_json": ..., "eval_md": ...,
        "gate": {"metric", "value"}, "content_hash": ...}``. Cached on the model folder's and
        the tokenized data's content, the eval and model sections, the seed and the code version.
    """
    from orpo_core.evaluation import run_evaluation
    from orpo_core.evaluation.results import metric_value

    r = load_recipe_dict(recipe)
    r.require_model()
    inputs = {
        "recipe": recipe,
        "model_dir": model_dir,
        "tokenized_dir": tokenized_dir,
        "out_dir": out_dir,
        "compare_base": compare_base,
    }
    log_history = log_history_path(model_dir)  # part of the cache key (orpo_core.runs.cache)
    if not compare_base:
        r.eval.compare_base = False
    with stage_run("evaluate", inputs) as box:
        run_evaluation(  # derives the base model from the recipe (eval.compare_base)
            r,
            Path(model_dir),
            Path(tokenized_dir),
            Path(out_dir),
            log_history=log_history if log_history.is_file() else None,
        )
        eval_json = Path(out_dir) / "eval.json"
        data = json.loads(eval_json.read_text(encoding="utf-8"))
        if r.train.report_to:  # the evaluation joins the training's tracker runs
            from orpo_core.evaluation.results import extract_metrics, pick_label
            from orpo_core.training.trackers import log_evaluation_metrics

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
    from .ui import eval_markdown, samples_markdown

    curves = Path(out_dir) / "curves.png"
    markdown_artifact(
        eval_markdown(data, r.run_name, r.eval.gate_metric, curves if curves.is_file() else None),
        artifact_key(r.run_name, "eval-results"),
        f"Evaluation of {r.run_name}: base, trained, change with 95 % intervals",
    )
    samples_md = samples_markdown(data, r.run_name)
    if samples_md:
        markdown_artifact(samples_md, artifact_key(r.run_name, "eval-samples"), f"Sample answers of {r.run_name}, base and trained side by side")
    return json_safe({**box["result"], "content_hash": box["content_hash"]})

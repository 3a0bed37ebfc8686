"""Scoring of the offline ``orpo_local_ifeval`` task: lm-eval's own ifeval functions,
imported only after NLTK's ``punkt_tab`` tables are made available offline
(:func:`orpo_core.evaluation.nltk_data.ensure_punkt_tab`), so lm-eval's import-time
``nltk.download("punkt_tab")`` is never reached.

Referenced by ``orpo_local_ifeval.yaml`` as ``!function orpo_core.evaluation.lm_eval_tasks.ifeval.<name>``.
"""

from __future__ import annotations

from typing import Any

from orpo_core.evaluation.nltk_data import ensure_punkt_tab

ensure_punkt_tab()

from lm_eval.tasks.ifeval import utils as _upstream  # noqa: E402  (needs punkt_tab at import)


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    """lm-eval ``lm_eval/tasks/ifeval/utils.py::process_results`` (strict and loose, prompt and instruction level)."""
    return _upstream.process_results(doc, results)


def agg_inst_level_acc(items: list[list[bool]]) -> float:
    """lm-eval ``agg_inst_level_acc``: the mean over all instructions of all prompts."""
    return _upstream.agg_inst_level_acc(items)

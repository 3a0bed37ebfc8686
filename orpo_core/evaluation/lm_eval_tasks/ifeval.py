"""Scoring of the offline ``orpo_local_ifeval`` task: lm-eval's own ifeval functions,
imported only after NLTK's ``punkt_tab`` tables are made available offline
(:func:`orpo_core.data.nltk_data.ensure_punkt_tab`), so lm-eval's import-time
``nltk.download("punkt_tab")`` is never reached.

Referenced by ``orpo_local_ifeval.yaml`` as ``!function orpo_core.evaluation.lm_eval_tasks.ifeval.<name>``.
"""

from __future__ import annotations

from typing import Any

from orpo_core.data.nltk_data import ensure_punkt_tab

ensure_punkt_tab()

from lm_eval.tasks.ifeval import utils as _upstream  # noqa: E402  (needs punkt_tab at import)


def _positions(dataset, parity: int):
    return dataset.filter(lambda _doc, i: i % 2 == parity, with_indices=True)


def dev_docs(dataset):
    """The development half of Google's IFEval: the prompts at even positions of the file (0, 2, 4, ...).

    Args:
        dataset: a ``datasets.Dataset`` of the 541 rows of ``ifeval_input.jsonl`` in file order.

    Returns:
        the 271 rows at even positions, in file order (lm-eval's ``doc_id`` is the position in this half).
    """
    return _positions(dataset, 0)


def test_docs(dataset):
    """The reserved test half: the prompts at odd positions of the file (1, 3, 5, ...; 270 of 541).
    Nothing (recipe, generator choice, hyper-parameter) is tuned on it."""
    return _positions(dataset, 1)


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    """lm-eval ``lm_eval/tasks/ifeval/utils.py::process_results`` (strict and loose, prompt and instruction level)."""
    return _upstream.process_results(doc, results)


def agg_inst_level_acc(items: list[list[bool]]) -> float:
    """lm-eval ``agg_inst_level_acc``: the mean over all instructions of all prompts."""
    return _upstream.agg_inst_level_acc(items)

"""Base vs trained on lm-eval tasks scored per prompt (IFEval): paired bootstrap intervals and
answers side by side, from lm-eval's own per-sample results.

:func:`orpo_core.evaluation.harness.run_lm_eval` keeps, for the tasks of
:data:`~orpo_core.evaluation.harness.PER_SAMPLE_METRICS` (``ifeval``, ``ifeval_dev``,
``ifeval_test``), each document's verdicts as lm-eval's ``process_results`` computed them
(Google's checks): ``prompt_level_<level>_acc`` (bool) and ``inst_level_<level>_acc`` (a list of
bools, one per instruction), ``<level>`` = ``strict`` or ``loose``.

The two models are paired by lm-eval's ``doc_id`` (the position in the task's documents; the same
``limit`` gives the same documents). For the ``n`` paired prompts, with ``f_i`` the verdict list of
prompt ``i`` (``m_i`` instructions, ``k_i`` followed) and ``p_i = all(f_i)``:

* ``Δ prompt level = mean_i(p_i^trained − p_i^base)``;
* ``Δ instruction level = Σ_i k_i^trained / Σ_i m_i − Σ_i k_i^base / Σ_i m_i`` (lm-eval's
  ``agg_inst_level_acc`` is the pooled ratio Σ k / Σ m).

The 95 % interval is the percentile bootstrap over prompts (the instructions of one prompt are not
independent): each of ``bootstrap_samples`` resamples draws ``n`` prompts with replacement, the same
ones for both models, from ``numpy.random.default_rng(seed)``; the statistic above is recomputed on
the resample (the instruction level as the ratio of the resampled sums). This is
:func:`orpo_core.evaluation.instruction_following.paired_instruction_deltas`, applied to lm-eval's
verdicts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .instruction_following import (
    INST_LEVEL,
    PROMPT_LEVEL,
    FollowResult,
    disagreement_order,
    paired_instruction_deltas,
)

LEVELS = ("strict", "loose")


def _by_doc(samples: Sequence[Mapping[str, Any]]) -> dict[int, Mapping[str, Any]]:
    out: dict[int, Mapping[str, Any]] = {}
    for s in samples:
        d = int(s["doc_id"])
        if d in out:
            raise ValueError(f"doc_id {d} occurs twice in the per-sample results")
        out[d] = s
    return out


def paired_samples(
    task: str, trained: Sequence[Mapping[str, Any]], base: Sequence[Mapping[str, Any]]
) -> tuple[list[int], list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """The two models' samples of ``task`` paired by ``doc_id``, in ``doc_id`` order.

    Returns:
        ``(doc_ids, trained samples, base samples)``, three lists of length n.

    Raises:
        ValueError: the two runs scored different document sets (naming how many differ and a few
            ``doc_id`` of each side), a ``doc_id`` repeated within a run, or one document whose
            instruction lists differ between the runs.
    """
    t, b = _by_doc(trained), _by_doc(base)
    if set(t) != set(b):
        only_t, only_b = sorted(set(t) - set(b)), sorted(set(b) - set(t))
        raise ValueError(
            f"lm-eval task {task!r}: the trained and base runs scored different documents "
            f"({len(t)} vs {len(b)}; only trained: {only_t[:5]}{'…' if len(only_t) > 5 else ''}, "
            f"only base: {only_b[:5]}{'…' if len(only_b) > 5 else ''}): evaluate both with the same tasks and limit"
        )
    ids = sorted(t)
    for d in ids:
        if t[d].get("instruction_id_list") != b[d].get("instruction_id_list"):
            raise ValueError(f"lm-eval task {task!r}: doc_id {d} has different instructions in the two runs")
    return ids, [t[d] for d in ids], [b[d] for d in ids]


def follow_result(task: str, samples: Sequence[Mapping[str, Any]], level: str = "strict") -> FollowResult:
    """lm-eval's per-instruction verdicts ``inst_level_<level>_acc`` of each sample as a
    :class:`~orpo_core.evaluation.instruction_following.FollowResult` (responses: the generations).

    Raises:
        ValueError: a sample's ``prompt_level_<level>_acc`` is not ``all(inst_level_<level>_acc)``
            (lm-eval's definition), or either is missing.
    """
    follow, responses = [], []
    for s in samples:
        inst, prompt = s.get(f"inst_level_{level}_acc"), s.get(f"prompt_level_{level}_acc")
        ok = isinstance(inst, (list, tuple)) and isinstance(prompt, bool)
        if not ok or prompt != all(inst):
            raise ValueError(
                f"lm-eval task {task!r}: doc_id {s.get('doc_id')}: prompt_level_{level}_acc={prompt} but "
                f"inst_level_{level}_acc={inst!r}"
            )
        follow.append([bool(x) for x in inst])
        responses.append(str(s.get("response") or ""))
    return FollowResult(responses, follow)


def paired_lm_eval_deltas(
    task: str,
    trained: Sequence[Mapping[str, Any]],
    base: Sequence[Mapping[str, Any]],
    *,
    bootstrap_samples: int,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """trained − base of lm-eval's IFEval metrics of ``task`` with paired bootstrap 95 % CIs (formula above).

    Args:
        task: the requested task name (``ifeval_dev``): the keys are ``lm_eval/<task>/<metric>,none``.
        trained, base: each model's samples of the task (``run_lm_eval(...)["samples"][task]``): dicts
            with ``doc_id`` (int), ``prompt_level_<level>_acc`` (bool), ``inst_level_<level>_acc``
            (list of bool), for ``<level>`` in ``strict`` and ``loose``.
        bootstrap_samples: resamples R (0: no interval).
        seed: the resamples' seed (the recipe seed).

    Returns:
        ``{"lm_eval/<task>/prompt_level_<level>_acc,none": {"value", "n" (prompts), "ci95": [low, high] or
        None, "wins", "losses"}, "lm_eval/<task>/inst_level_<level>_acc,none": {"value", "n", "ci95"}}``
        for both levels (``wins``: prompts only the trained model follows fully; ``losses``: only the
        base); the shape of :func:`~orpo_core.evaluation.instruction_following.paired_instruction_deltas`.
        Empty when there are no samples.

    Raises:
        ValueError: different document sets or inconsistent verdicts (:func:`paired_samples`,
            :func:`follow_result`).
    """
    _, ts, bs = paired_samples(task, trained, base)
    out: dict[str, dict[str, Any]] = {}
    for level in LEVELS:
        d = paired_instruction_deltas(
            follow_result(task, ts, level), follow_result(task, bs, level), bootstrap_samples=bootstrap_samples, seed=seed
        )
        if d:
            out[f"lm_eval/{task}/prompt_level_{level}_acc,none"] = d[PROMPT_LEVEL]
            out[f"lm_eval/{task}/inst_level_{level}_acc,none"] = d[INST_LEVEL]
    return out


def verdicts(samples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The samples without prompt, instructions and generation (what ``eval.json`` keeps per model):
    ``doc_id``, ``key`` and the verdicts."""
    drop = ("prompt", "response", "instruction_id_list", "kwargs")
    return [{k: v for k, v in s.items() if k not in drop} for s in samples]


def side_by_side_samples(task: str, samples: Mapping[str, Sequence[Mapping[str, Any]]], k: int) -> list[dict[str, Any]]:
    """Up to ``k`` documents answered by every model, those with different strict verdicts first.

    Args:
        task: the task name (error messages).
        samples: ``{model label: samples}`` (labels in display order).
        k: how many.

    Returns:
        The shape of :func:`~orpo_core.evaluation.instruction_following.side_by_side` (what
        :func:`orpo_core.evaluation.report.examples_markdown` renders): ``prompt``, ``origin``
        (``doc <doc_id>, key <key>``), ``constraints`` (``[{"id", "kwargs"}]``) and per model
        ``{"answer", "follow"}`` (strict verdicts).
    """
    labels = list(samples)
    if k <= 0 or not labels:
        return []
    if len(labels) == 1:
        rows = {labels[0]: sorted(samples[labels[0]], key=lambda s: int(s["doc_id"]))}
    else:
        _, *paired = paired_samples(task, samples[labels[0]], samples[labels[1]])
        rows = dict(zip(labels[:2], paired))
    follows = {lb: follow_result(task, r).follow for lb, r in rows.items()}
    out = []
    for i in disagreement_order(follows)[:k]:
        first = rows[labels[0]][i]
        ids_ = first.get("instruction_id_list") or []
        kwargs = first.get("kwargs") or [{}] * len(ids_)
        ex: dict[str, Any] = {
            "prompt": first.get("prompt") or "",
            "origin": f"doc {first['doc_id']}, key {first.get('key')}",
            "constraints": [{"id": cid, "kwargs": dict(kw or {})} for cid, kw in zip(ids_, kwargs)],
        }
        for lb in rows:
            ex[lb] = {"answer": str(rows[lb][i].get("response") or ""), "follow": follows[lb][i]}
        out.append(ex)
    return out

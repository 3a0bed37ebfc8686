"""Reading an ``eval.json`` back: per-model metrics with their intervals, the trained / base labels.

:func:`extract_metrics` accepts the layouts an evaluation report may use (model-major
``results[model][metric]`` or metric-major ``results[metric][model]``, values as plain numbers
or ``{"value": .., "ci": ..}`` dicts, nested sections flattened with ``/``). The model card,
the sweep report, the retraining gate and the pipeline's summary all read results through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

# labels the evaluation report may use for the trained model / the base model
TRAINED_LABELS = ("trained", "model", "orpo", "final", "finetuned", "fine-tuned", "policy")
BASE_LABELS = ("base", "base_model", "reference")
_SKIP_LABELS = ("delta", "deltas", "diff", "difference")
_VALUE_KEYS = ("value", "mean", "estimate", "score", "point")
_CI_KEYS = (("ci_low", "ci_high"), ("ci_lower", "ci_upper"), ("low", "high"), ("lower", "upper"))

@dataclass(frozen=True)
class MetricValue:
    """One reported number: ``value`` with an optional 95 % CI ``(low, high)`` and sample count ``n``."""

    value: float
    ci: tuple[float, float] | None = None
    n: int | None = None


def as_number(x: Any) -> float | None:
    """``x`` as a finite float, or None (bools, non-numbers, NaN and inf)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _as_metric(node: Any) -> MetricValue | None:
    """A number, or a dict holding a value key (``value``/``mean``/...) and optional CI / n."""
    v = as_number(node)
    if v is not None:
        return MetricValue(v)
    if not isinstance(node, Mapping):
        return None
    value = next((as_number(node[k]) for k in _VALUE_KEYS if k in node and as_number(node[k]) is not None), None)
    if value is None:
        return None
    ci = None
    raw_ci = next((node[k] for k in ("ci", "ci95", "confidence_interval") if k in node), None)
    if isinstance(raw_ci, (list, tuple)) and len(raw_ci) == 2 and all(as_number(c) is not None for c in raw_ci):
        ci = (float(raw_ci[0]), float(raw_ci[1]))
    for src in (raw_ci, node):
        if ci is not None or not isinstance(src, Mapping):
            continue
        for lo, hi in _CI_KEYS:
            if as_number(src.get(lo)) is not None and as_number(src.get(hi)) is not None:
                ci = (float(src[lo]), float(src[hi]))
                break
    n = node.get("n")
    return MetricValue(value, ci, int(n) if isinstance(n, int) and not isinstance(n, bool) else None)


def _flatten(node: Any, prefix: str, out: dict[str, MetricValue]) -> None:
    m = _as_metric(node)
    if m is not None:
        if prefix:
            out[prefix] = m
        return
    if isinstance(node, Mapping):
        for k, v in node.items():
            _flatten(v, f"{prefix}/{k}" if prefix else str(k), out)


def _looks_like_metric(key: str) -> bool:
    return "/" in key


def extract_metrics(eval_data: Mapping[str, Any]) -> dict[str, dict[str, MetricValue]]:
    """Per-model metrics from an ``eval.json`` dict: ``{model_label: {metric: MetricValue}}``.

    Reads ``eval_data["results"]`` (or the dict itself when it has no
    ``results``), completed with the CIs and counts of ``eval_data["metrics"]``
    (``{label: {metric: {"value", "n", "ci95"}}}``, as written by
    :func:`orpo_core.evaluation.run_evaluation`). Model-major (``results[model][metric]``) and metric-major
    (``results[metric][model]``, detected by ``/`` in the top-level keys) are
    both accepted; nested sections are joined with ``/`` (``lm_eval`` →
    ``hellaswag`` → ``acc`` gives ``lm_eval/hellaswag/acc``). Labels such as
    ``delta`` are skipped. Non-finite and non-numeric values are ignored.
    """
    out = _extract(eval_data.get("results", eval_data) if isinstance(eval_data, Mapping) else {})
    details = eval_data.get("metrics") if isinstance(eval_data, Mapping) else None
    if isinstance(details, Mapping) and details is not eval_data.get("results"):
        # orpo_core.evaluation writes plain values in "results" and {value, n, ci95} in "metrics"
        for label, detailed in _extract(details).items():
            for name, m in detailed.items():
                cur = out.get(label, {}).get(name)
                if cur is None or (math.isclose(cur.value, m.value, rel_tol=1e-9, abs_tol=1e-12)):
                    out.setdefault(label, {})[name] = m
    return out


def _extract(results: Any) -> dict[str, dict[str, MetricValue]]:
    if not isinstance(results, Mapping):
        return {}
    out: dict[str, dict[str, MetricValue]] = {}
    keys = [str(k) for k in results]
    if keys and sum(_looks_like_metric(k) for k in keys) > len(keys) / 2:
        for metric, per_model in results.items():
            if isinstance(per_model, Mapping) and _as_metric(per_model) is None:
                for label, node in per_model.items():
                    if str(label).lower() in _SKIP_LABELS:
                        continue
                    m = _as_metric(node)
                    if m is not None:
                        out.setdefault(str(label), {})[str(metric)] = m
            else:
                m = _as_metric(per_model)
                if m is not None:
                    out.setdefault("trained", {})[str(metric)] = m
        return out
    for label, node in results.items():
        if str(label).lower() in _SKIP_LABELS or not isinstance(node, Mapping):
            continue
        flat: dict[str, MetricValue] = {}
        _flatten(node, "", flat)
        if flat:
            out[str(label)] = flat
    return out


def pick_label(metrics: Mapping[str, Any], which: str = "trained") -> str | None:
    """The label of the trained (``which="trained"``) or base model among ``metrics``' keys."""
    labels = list(metrics)
    lowered = {label.lower(): label for label in labels}
    if which == "base":
        return next((lowered[b] for b in BASE_LABELS if b in lowered), None)
    hit = next((lowered[t] for t in TRAINED_LABELS if t in lowered), None)
    if hit is not None:
        return hit
    return next((label for label in labels if label.lower() not in BASE_LABELS), None)


def metric_value(eval_data: Mapping[str, Any], metric: str, which: str = "trained") -> float | None:
    """The value of ``metric`` (e.g. ``preference/accuracy``) for the trained or base model, or None."""
    metrics = extract_metrics(eval_data)
    label = pick_label(metrics, which)
    if label is None:
        return None
    m = metrics[label].get(metric)
    return None if m is None else m.value

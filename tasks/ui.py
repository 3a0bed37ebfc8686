"""Markdown for the Prefect UI: base / trained / change with 95 % intervals and a verdict, small
stats tables, images embedded as PNG data URIs, and the run summary.

Everything here is a pure function of the stage outputs (``eval.json``, ``stats.json``,
``metrics.json``, PNG files): no Prefect import, so the builders are unit-tested on their own and
the tasks / flows only publish what they return (:mod:`tasks.artifacts`).

Numbers go through :func:`orpo_core.io.fmt_value` (4 significant digits, integral values without
decimals). A *change* is trained − base; its interval is the paired bootstrap CI that the
evaluation writes in ``eval.json["delta_details"]`` (same pairs / prompts for both models). The
verdict is ``better`` / ``worse`` when that interval excludes 0 (by the metric's direction:
perplexity lower is better), ``within noise`` when it contains 0, and ``no interval`` when the
evaluation reported none.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from orpo_core.io import fmt_value

#: the largest embedded image (bytes of PNG before base64); bigger ones are linked by path instead
MAX_IMAGE_BYTES = 150_000

#: headline metrics of the run summary (after the gate metric), when the evaluation reported them
HEADLINE_METRICS = (
    "preference/accuracy",
    "preference/margin",
    "perplexity/chosen",
    "instructions/prompt_level_strict_acc",
    "lm_eval/ifeval_dev/prompt_level_strict_acc,none",
    "lm_eval/ifeval_dev/inst_level_strict_acc,none",
)


# --------------------------------------------------------------------------- images
def png_data_uri(path: str | Path, max_width_px: int = 900, colors: int = 64, max_bytes: int = MAX_IMAGE_BYTES) -> str | None:
    """A PNG file as a ``data:image/png;base64,...`` URI small enough for a markdown artifact.

    The image is scaled down (Lanczos) to at most ``max_width_px`` pixels wide, keeping its
    aspect ratio, and stored with an adaptive palette of ``colors`` colours (line plots keep
    their look; an 80 KB matplotlib figure becomes ~20-40 KB). Transparent pixels are put on
    white (the Prefect UI is dark: a transparent figure would show black on black).

    Returns:
        The URI, or None when the file is missing, not an image, or still larger than
        ``max_bytes`` bytes after shrinking (the caller then names the file instead).
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        return None
    try:
        with Image.open(p) as im:
            im = im.convert("RGBA")
    except (OSError, UnidentifiedImageError):
        return None
    # transparent pixels onto white: dropping alpha would turn them black, and the UI is dark
    # (black lines on a black background show as an empty box)
    white = Image.new("RGBA", im.size, (255, 255, 255, 255))
    im = Image.alpha_composite(white, im).convert("RGB")
    if im.width > max_width_px:
        im = im.resize((max_width_px, max(1, round(im.height * max_width_px / im.width))), Image.Resampling.LANCZOS)
    im = im.quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    data = buf.getvalue()
    if len(data) > max_bytes:
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def image_markdown(path: str | Path | None, alt: str, **kwargs: Any) -> str:
    """``![alt](data URI)`` of :func:`png_data_uri`, or an italic line naming the file when it
    cannot be embedded (empty string when ``path`` is None)."""
    if path is None:
        return ""
    uri = png_data_uri(path, **kwargs)
    if uri is None:
        return f"*{alt}: `{path}` (not embedded)*" if Path(path).is_file() else ""
    return f"![{alt}]({uri})"


# --------------------------------------------------------------------------- numbers
def fmt_ci(ci: Sequence[float] | None) -> str:
    """``[low, high]`` with 3 significant digits, or an empty string."""
    if not ci:
        return ""
    return f"[{fmt_value(float(ci[0]), 3)}, {fmt_value(float(ci[1]), 3)}]"


def fmt_with_ci(value: float | None, ci: Sequence[float] | None = None, signed: bool = False) -> str:
    """``0.8153 [0.79, 0.84]`` (``+0.012 [...]`` when ``signed``); ``–`` for None."""
    if value is None:
        return "–"
    v = fmt_value(float(value))
    if signed and not v.startswith("-") and float(value) != 0:
        v = "+" + v
    return f"{v} {fmt_ci(ci)}".rstrip()


def direction(metric: str, detail: Mapping[str, Any] | None = None) -> str | None:
    """``"max"`` when higher is better, ``"min"`` when lower is better, else None.

    Known metrics from :data:`orpo_core.evaluation.report.DIRECTIONS` (perplexity: ``min``);
    lm-eval metrics from their ``higher_is_better`` flag in ``detail``; any other
    ``perplexity/…`` or ``…loss`` is ``min``."""
    from orpo_core.evaluation.report import DIRECTIONS

    if metric in DIRECTIONS:
        return DIRECTIONS[metric]
    hib = (detail or {}).get("higher_is_better") if isinstance(detail, Mapping) else None
    if hib is not None:
        return "max" if hib else "min"
    if metric.startswith("perplexity/") or metric.endswith("loss"):
        return "min"
    return None


def verdict(ci: Sequence[float] | None, metric_direction: str | None) -> str:
    """``better`` / ``worse`` when the change's 95 % interval ``ci`` excludes 0 (judged by
    ``metric_direction``, ``higher`` / ``lower`` when it is unknown), ``within noise`` when it
    contains 0, ``no interval`` when there is none."""
    if not ci:
        return "no interval"
    lo, hi = float(ci[0]), float(ci[1])
    if lo <= 0 <= hi:
        return "within noise"
    up = lo > 0
    if metric_direction is None:
        return "higher" if up else "lower"
    return "better" if up == (metric_direction == "max") else "worse"


# --------------------------------------------------------------------------- comparison
@dataclass(frozen=True)
class Comparison:
    """One metric of an evaluation: base, trained and change (trained − base) with 95 % CIs.

    ``paired`` is True when the change's CI is the paired bootstrap of ``eval.json``; the
    ``verdict`` follows :func:`verdict`.
    """

    metric: str
    base: float | None
    base_ci: tuple[float, float] | None
    trained: float | None
    trained_ci: tuple[float, float] | None
    change: float | None
    change_ci: tuple[float, float] | None
    paired: bool
    verdict: str


def _ci_of(node: Any) -> tuple[float, float] | None:
    ci = node.get("ci95") if isinstance(node, Mapping) else None
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(c, (int, float)) for c in ci):
        return (float(ci[0]), float(ci[1]))
    return None


def compare(eval_data: Mapping[str, Any], metrics: Iterable[str] | None = None) -> list[Comparison]:
    """Base / trained / change of each metric of an ``eval.json`` dict (every metric of the
    trained model, or those of ``metrics`` that were measured, in that order).

    The change and its CI come from ``eval_data["delta_details"][metric]`` (``{"value",
    "ci95"}``: paired bootstrap); without it the change is trained − base with no interval.
    """
    from orpo_core.evaluation.results import extract_metrics, pick_label

    found = extract_metrics(eval_data)
    tl, bl = pick_label(found, "trained"), pick_label(found, "base")
    trained = found.get(tl, {}) if tl else {}
    base = found.get(bl, {}) if bl else {}
    deltas = eval_data.get("delta_details") or {}
    details = (eval_data.get("metrics") or {}).get(tl or "trained") or {}
    names = [m for m in metrics if m in trained or m in base] if metrics is not None else list(trained)
    out = []
    for name in dict.fromkeys(names):
        t, b = trained.get(name), base.get(name)
        d = deltas.get(name) if isinstance(deltas, Mapping) else None
        if isinstance(d, Mapping) and isinstance(d.get("value"), (int, float)):
            change, change_ci = float(d["value"]), _ci_of(d)
        elif t is not None and b is not None:
            change, change_ci = t.value - b.value, None
        else:
            change, change_ci = None, None
        out.append(
            Comparison(
                metric=name,
                base=b.value if b else None,
                base_ci=b.ci if b else None,
                trained=t.value if t else None,
                trained_ci=t.ci if t else None,
                change=change,
                change_ci=change_ci,
                paired=change_ci is not None,
                verdict=verdict(change_ci, direction(name, details.get(name))) if change is not None else "–",
            )
        )
    return out


def comparison_markdown(rows: Sequence[Comparison], gate_metric: str | None = None) -> str:
    """``| metric | base [95 % CI] | trained [95 % CI] | change [95 % CI] | verdict |`` (the gate
    metric marked ``(gate)``); empty string for no rows."""
    if not rows:
        return ""
    lines = ["| metric | base [95 % CI] | trained [95 % CI] | change [95 % CI] | verdict |", "|---|---|---|---|---|"]
    for r in rows:
        name = f"`{r.metric}`" + (" (gate)" if r.metric == gate_metric else "")
        lines.append(
            f"| {name} | {fmt_with_ci(r.base, r.base_ci)} | {fmt_with_ci(r.trained, r.trained_ci)} | "
            f"{fmt_with_ci(r.change, r.change_ci, signed=True)} | {r.verdict} |"
        )
    return "\n".join(lines) + "\n"


def _interval_note(eval_data: Mapping[str, Any]) -> str:
    s = eval_data.get("settings") or {}
    extra = []
    if s.get("bootstrap_samples"):
        extra.append(f"{fmt_value(s['bootstrap_samples'])} resamples")
    if s.get("n_pairs"):
        extra.append(f"{fmt_value(s['n_pairs'])} held-out pairs")
    return ("Intervals: 95 % bootstrap" + (f" ({', '.join(extra)})" if extra else "")
            + "; the change's interval is paired (same pairs / prompts for both models).")


def eval_markdown(eval_data: Mapping[str, Any], run_name: str, gate_metric: str | None = None, curves: str | Path | None = None) -> str:
    """The evaluation artifact: the comparison table of every metric (:func:`compare`), what
    the intervals are, the gate metric's value, and the training curves embedded."""
    rows = compare(eval_data)
    lines = [f"# Evaluation of {run_name}", ""]
    if not rows:
        lines.append("_No metrics were reported._")
    else:
        lines += [comparison_markdown(rows, gate_metric), _interval_note(eval_data), ""]
        lines.append("Verdict: *better* / *worse* when the change's interval excludes 0 (perplexity: lower is better), "
                     "*within noise* when it contains 0.")
    img = image_markdown(curves, "training curves")
    if img:
        lines += ["", "## Training curves", "", img]
    return "\n".join(lines).rstrip() + "\n"


def _esc(text: Any) -> str:
    s = str(text if text is not None else "")
    if not s.strip():
        return "*(empty)*"
    return s.strip().replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def samples_markdown(eval_data: Mapping[str, Any], run_name: str, max_chars: int = 400) -> str:
    """The sample-answers artifact: the greedy answers of base and trained side by side for
    the recipe's prompts (``eval.json["generations"]``), the instruction-following examples
    with pass / fail per constraint (``eval.json["instructions"]``) and lm-eval's IFEval answers
    with Google's checks (``eval.json["lm_eval"]["examples"]``); empty when there are none.
    Answers longer than ``max_chars`` characters are cut (``…``)."""
    from orpo_core.evaluation.report import instruction_markdown, lm_eval_examples_markdown

    lines: list[str] = []
    gens = [g for g in (eval_data.get("generations") or []) if isinstance(g, Mapping)]
    if gens:
        cols = [c for c in ("base", "trained") if any(c in g for g in gens)]
        lines += [f"# Sample answers of {run_name}", "", "Greedy answers to the recipe's prompts (`eval.prompts`).", ""]
        lines.append("| prompt | " + " | ".join(cols) + " |")
        lines.append("|---" * (1 + len(cols)) + "|")
        for g in gens:
            cells = [_esc(g.get("prompt"))]
            for c in cols:
                a = str(g.get(c, ""))
                cells.append(_esc(a if len(a) <= max_chars else a[:max_chars] + "…"))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if eval_data.get("instructions") and eval_data.get("metrics"):
        if not lines:
            lines += [f"# Sample answers of {run_name}", ""]
        lines += instruction_markdown(dict(eval_data))
    lm = lm_eval_examples_markdown(dict(eval_data)) if eval_data.get("metrics") else []
    if lm:
        if not lines:
            lines += [f"# Sample answers of {run_name}", ""]
        lines += lm
    return "\n".join(lines).strip() + ("\n" if lines else "")


# --------------------------------------------------------------------------- stats
def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    body = ["| " + " | ".join(_esc(fmt_value(v)) if not isinstance(v, str) else v for v in row) + " |" for row in rows]
    if not body:
        return ""
    return "\n".join(["| " + " | ".join(header) + " |", "|---" * len(header) + "|", *body]) + "\n"


def data_stats_markdown(stats: Mapping[str, Any], run_name: str) -> str:
    """The data-preparation artifact from ``data/stats.json``: totals, one row per split (rows,
    multi-turn, with system prompt, with scores, by source), drops by reason, one row per source."""
    lines = [f"# Data of {run_name}", ""]
    lines.append(_table(
        ["rows read", "added by binarize", "kept", "dropped"],
        [[stats.get("rows_read"), stats.get("pairs_added_by_binarize"), stats.get("rows_kept"), stats.get("dropped_total")]],
    ))
    splits = stats.get("splits") or {}
    if splits:
        lines.append(_table(
            ["split", "pairs", "multi-turn", "with system", "with scores", "by source"],
            [[name, s.get("rows"), s.get("multi_turn"), s.get("with_system"), s.get("with_scores"),
              ", ".join(f"{k}: {fmt_value(v)}" for k, v in (s.get("by_source") or {}).items()) or "–"]
             for name, s in splits.items() if isinstance(s, Mapping)],
        ))
    dropped = stats.get("dropped") or {}
    sources = stats.get("sources") or {}
    if dropped:
        per_split: dict[str, dict[str, int]] = {}
        for src in sources.values():
            for split, c in ((src or {}).get("inputs") or {}).items():
                for reason, n in ((c or {}).get("dropped") or {}).items():
                    per_split.setdefault(reason, {}).setdefault(split, 0)
                    per_split[reason][split] += int(n)
        split_names = sorted({s for d in per_split.values() for s in d})
        lines += ["Dropped pairs by reason:", ""]
        lines.append(_table(
            ["reason", *(f"{s} input" for s in split_names), "total"],
            [[f"`{reason}`", *(per_split.get(reason, {}).get(s, 0) for s in split_names), n] for reason, n in dropped.items()],
        ))
    else:
        lines += ["No pair was dropped.", ""]
    if sources:
        lines.append(_table(
            ["source", "format", "read", "kept", "dropped", "train", "test"],
            [[f"`{label}`", str(s.get("format") or "–"), s.get("read"), s.get("kept"), s.get("dropped_total"),
              (s.get("outputs") or {}).get("train"), (s.get("outputs") or {}).get("test")]
             for label, s in sources.items() if isinstance(s, Mapping)],
        ))
    return "\n".join(x for x in lines if x is not None).rstrip() + "\n"


LENGTH_FIELDS = ("prompt", "chosen", "rejected", "total")


def tokenization_markdown(stats: Mapping[str, Any], run_name: str) -> str:
    """The tokenization artifact from ``tokenized/stats.json``: one row per split (pairs in / out,
    dropped, truncations, tokens), token-length percentiles as columns with one row per split
    and field (``total`` = prompt + longer completion), and the tokenizer in one line."""
    tok = stats.get("tokenization") or {}
    lines = [f"# Tokenization of {run_name}", ""]
    lines.append(f"max length {fmt_value(tok.get('max_length'))}, max prompt length {fmt_value(tok.get('max_prompt_length'))}; "
                 f"{tok.get('truncation', '')}")
    lines.append("")
    splits = [(k, v) for k, v in tok.items() if isinstance(v, Mapping) and "rows_in" in v]
    lines.append(_table(
        ["split", "pairs in", "pairs out", "dropped", "prompt truncated", "completion truncated", "tokens"],
        [[k, v.get("rows_in"), v.get("rows_out"), sum((v.get("dropped") or {}).values()),
          v.get("prompt_truncated"), v.get("completion_truncated"), v.get("tokens")] for k, v in splits],
    ))
    pct_rows = []
    pct_cols: list[str] = []
    for k, v in splits:
        for field in LENGTH_FIELDS:
            p = (v.get("lengths") or {}).get(field)
            if isinstance(p, Mapping):
                pct_cols = pct_cols or list(p)
                pct_rows.append([k, field, *(p.get(c) for c in pct_cols)])
    if pct_rows:
        lines += ["Token lengths after truncation:", "", _table(["split", "field", *pct_cols], pct_rows)]
    info = stats.get("tokenizer") or {}
    shown = {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool)) and k != "fingerprint"}
    if shown:
        lines.append("Tokenizer: " + ", ".join(f"{k} `{fmt_value(v) if not isinstance(v, str) else v}`" for k, v in list(shown.items())[:8]))
    return "\n".join(lines).rstrip() + "\n"


def train_metrics_rows(metrics: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """``{"metric", "value"}`` rows of ``train/metrics.json`` (``{"train": {...}, "eval": {...}}``
    or flat): each TRL name once (``eval_loss``, not ``eval.eval_loss``; a name in both sections,
    e.g. ``epoch``, as ``eval.epoch`` the second time), then the top-level numbers
    (``global_step``, ``num_train_pairs``); other sections (``last_train_log``) and
    non-numeric values left out."""
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()

    def add(name: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return
        seen.add(name)
        rows.append({"metric": name, "value": v})

    for k, v in (metrics or {}).items():
        if k in ("train", "eval") and isinstance(v, Mapping):
            for kk, vv in v.items():
                add(kk if kk not in seen else f"{k}.{kk}", vv)
        elif not isinstance(v, Mapping) and k not in seen:  # other sections (last_train_log) repeat the logs
            add(k, v)
    return rows


# --------------------------------------------------------------------------- run summary
@dataclass(frozen=True)
class StageLine:
    """One stage of a run for the summary: its state (``Completed`` / ``Cached`` / …) and, for a
    cached stage, the flow run that produced its result (id, name, UI link)."""

    stage: str
    state: str
    producer_name: str | None = None
    producer_url: str | None = None


def stages_markdown(stages: Sequence[StageLine]) -> str:
    """``| stage | state | result from |``: *this run* for a stage that ran, a link to the flow
    run that produced a cached stage's result (its name when no link is known)."""
    rows = []
    for s in stages:
        if s.state != "Cached":
            src = "this run"
        elif s.producer_url:
            src = f"[{s.producer_name or 'earlier flow run'}]({s.producer_url})"
        else:
            src = s.producer_name or "an earlier run (not recorded)"
        rows.append(f"| {s.stage} | {s.state} | {src} |")
    return "\n".join(["| stage | state | result from |", "|---|---|---|", *rows]) + "\n"


def run_summary_markdown(
    run_name: str,
    out_dir: str | Path,
    stages: Sequence[StageLine],
    eval_data: Mapping[str, Any] | None = None,
    gate_metric: str | None = None,
    gate_mode: str | None = None,
    train_metrics: Mapping[str, Any] | None = None,
    curves: str | Path | None = None,
    headline: Sequence[str] = HEADLINE_METRICS,
) -> str:
    """The run-summary artifact (``<run>-summary``) of a pipeline run, cached or not.

    Sections: the stage states (:func:`stages_markdown`), the absolute output folder,
    base / trained / change with 95 % intervals for the gate metric and the ``headline``
    metrics (:func:`compare`), the final train / eval loss, and the loss curves embedded
    (``curves``: the evaluation's ``curves.png``).
    """
    lines = [f"# Run {run_name}", "", stages_markdown(stages), f"Output folder: `{Path(out_dir).resolve()}`", ""]
    if eval_data:
        metrics = [m for m in [gate_metric, *headline] if m]
        rows = compare(eval_data, metrics)
        if rows:
            lines += ["## Results", "", comparison_markdown(rows, gate_metric), _interval_note(eval_data), ""]
        gate_row = next((r for r in rows if r.metric == gate_metric), None)
        if gate_metric and gate_row is None:
            lines += [f"Gate metric `{gate_metric}` was not measured.", ""]
        elif gate_row is not None and gate_mode:
            lines += [f"Gate: `{gate_metric}` ({'higher' if gate_mode == 'max' else 'lower'} is better) = "
                      f"{fmt_with_ci(gate_row.trained, gate_row.trained_ci)}.", ""]
    losses = {r["metric"]: r["value"] for r in train_metrics_rows(train_metrics)}
    shown = [(k, losses[k]) for k in ("train_loss", "eval_loss", "epoch", "global_step") if k in losses]
    if shown:
        lines += ["Final training: " + ", ".join(f"`{k}` {fmt_value(v)}" for k, v in shown), ""]
    img = image_markdown(curves, "training curves")
    if img:
        lines += ["## Training curves", "", img, ""]
    return "\n".join(lines).rstrip() + "\n"

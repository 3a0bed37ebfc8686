"""Evaluation report: ``eval.json`` (every number), ``eval.md`` (tables) and ``curves.png``.

The three files are written into one staging folder that replaces the eval folder in one atomic
exchange (:func:`write_report`), so they are always published together.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from orpo_core.io import atomic_write, atomic_write_json, atomic_write_text, read_json, staging_dir
from .errors import EvalInputError

#: (title, train key, eval key) of the panels in ``curves.png`` (TRL ORPOTrainer log names)
CURVES = (
    ("loss", "loss", "eval_loss"),
    ("rewards/margins", "rewards/margins", "eval_rewards/margins"),
    ("rewards/accuracies", "rewards/accuracies", "eval_rewards/accuracies"),
)

#: direction of improvement of the stage's own metrics (lm-eval metrics carry theirs)
DIRECTIONS = {
    "preference/accuracy": "max",
    "preference/margin": "max",
    "preference/log_odds": "max",
    "preference/logps_chosen": "max",
    "perplexity/chosen": "min",
    "perplexity/corpus": "min",
    "instructions/prompt_level_strict_acc": "max",
    "instructions/inst_level_strict_acc": "max",
}


# --------------------------------------------------------------------------- log history
def load_log_history(log_history: str | os.PathLike | list | None) -> list[dict[str, Any]]:
    """Trainer log history as a list of dicts.

    Accepts None (empty), a list, or a path to ``log_history.json`` (a list) or a
    Trainer ``trainer_state.json`` (``{"log_history": [...]}``).

    Raises:
        EvalInputError: the path does not exist or does not hold such a list.
    """
    if log_history is None:
        return []
    if isinstance(log_history, list):
        data: Any = log_history
        where = "log_history"
    else:
        data = read_json(log_history, EvalInputError)
        where = str(log_history)
        if isinstance(data, dict) and "log_history" in data:
            data = data["log_history"]
    if not isinstance(data, list):
        raise EvalInputError(f"{where}: expected a list of log entries, got {type(data).__name__}")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise EvalInputError(f"{where}: entry {i} is {type(entry).__name__}, not an object")
    return data


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, e in enumerate(history):
        v = e.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(float(e.get("step", i)))
            ys.append(float(v))
    return xs, ys


def plot_curves(history: list[dict[str, Any]], path: str | os.PathLike) -> Path | None:
    """Plot loss, rewards/margins and rewards/accuracies (train and eval) against the
    optimizer step into a PNG (matplotlib Agg canvas, no global backend change).

    Returns:
        The path, or None (nothing written) when no entry has any of those keys.
    """
    panels = [(title, _series(history, tk), _series(history, ek)) for title, tk, ek in CURVES]
    if not any(tr[0] or ev[0] for _, tr, ev in panels):
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(panels), 3.4), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels))
    for ax, (title, (tx, ty), (ex, ey)) in zip(axes, panels):
        if tx:
            ax.plot(tx, ty, label="train", color="tab:blue", lw=1.2)
        if ex:
            ax.plot(ex, ey, label="eval", color="tab:orange", marker="o", ms=3, lw=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if tx or ex:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.tight_layout()
    return atomic_write(path, lambda p: fig.savefig(p, format="png"))


# --------------------------------------------------------------------------- markdown
def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v != v:  # NaN
            return "nan"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.{digits}f}"
    return str(v)


def _cell(detail: dict[str, Any] | None) -> str:
    if not detail:
        return "–"
    s = _fmt(detail.get("value"))
    ci = detail.get("ci95")
    if ci:
        s += f" [{_fmt(ci[0], 3)}, {_fmt(ci[1], 3)}]"
    elif detail.get("stderr") is not None:
        s += f" ± {_fmt(detail['stderr'], 3)}"
    return s


def _better(key: str, delta: float | None, direction: str | None) -> str:
    if delta is None or direction is None or delta == 0:
        return ""
    up = delta > 0
    return "better" if (up == (direction == "max")) else "worse"


def _esc(text: str) -> str:
    if not text.strip():
        return "*(empty)*" if not text else f"*(whitespace only, {len(text)} chars)*"
    return text.strip().replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def _direction(key: str, detail: dict[str, Any] | None) -> str | None:
    if key in DIRECTIONS:
        return DIRECTIONS[key]
    hib = (detail or {}).get("higher_is_better")
    return None if hib is None else ("max" if hib else "min")


def render_markdown(report: dict[str, Any]) -> str:
    """``eval.md``: models, preference, perplexity and lm-eval tables (base, trained,
    delta with paired CI), side-by-side generations and the curves image."""
    labels = [m for m in ("base", "trained") if m in report["metrics"]]
    shown = {**{m: m for m in ("base", "trained")}, **(report.get("labels") or {})}  # display names
    metrics, deltas = report["metrics"], report.get("delta_details", {})
    s = report["settings"]
    lines = [f"# Evaluation: {report['run_name']}", ""]
    lines += ["## Models", "", "| role | model | kind | revision | weights sha256 | parameters |", "|---|---|---|---|---|---|"]
    for role in ("trained", "base"):
        m = report["models"].get(role)
        if not m:
            continue
        fp = (m.get("fingerprint") or {}).get("weights_sha256") or ((m.get("base") or {}).get("fingerprint") or {}).get("weights_sha256")
        rev = m.get("commit") or m.get("revision")
        name = f"`{m['name_or_path']}`"
        if (m.get("origin") or {}).get("description"):
            name = f"{m['origin']['description']}, converted in {name}"
        lines.append(
            f"| {shown[role]} | {name} | {m['kind']} | {rev or '–'} | {fp[:12] if fp else '–'} | "
            f"{_fmt(m.get('n_parameters'))} |"
        )
    lines.append("")
    reuse = report.get("base_cache") or {}
    if reuse.get("status") == "reused":
        lines += [
            (f"The {shown['base']} model's results were reused from `{reuse.get('path')}` (evaluated "
             f"{reuse.get('evaluated_utc')}; same weights sha256, inputs, evaluation settings and code)."),
            "",
        ]
    if report.get("skipped"):
        lines += ["## Skipped", "", "Not measured in this evaluation:", ""]
        lines += [f"- {x}" for x in report["skipped"]] + [""]

    def table(title: str, keys: list[str], note: str, extra=None) -> None:
        if not keys:
            return
        lines.extend([f"## {title}", "", note, ""])
        head = "| metric | " + " | ".join(shown[m] for m in labels) + (" | Δ trained − base | |" if len(labels) == 2 else " |")
        lines.append(head)
        lines.append("|---" * (1 + len(labels) + (2 if len(labels) == 2 else 0)) + "|")
        for k in keys:
            row = [f"`{k}`"] + [_cell(metrics[m].get(k)) for m in labels]
            if len(labels) == 2:
                d = deltas.get(k)
                dv = (d or {}).get("value")
                row += [_cell(d), _better(k, dv, _direction(k, metrics["trained"].get(k)))]
            lines.append("| " + " | ".join(row) + " |")
        if extra:
            lines.extend(["", extra])
        lines.append("")

    all_keys = []
    for m in labels:
        all_keys += [k for k in metrics[m] if k not in all_keys]
    pref = [k for k in all_keys if k.startswith("preference/")]
    ppl = [k for k in all_keys if k.startswith("perplexity/")]
    lm = [k for k in all_keys if k.startswith("lm_eval/")]
    n_pairs = s.get("n_pairs")
    table(
        "Held-out preference",
        pref,
        f"{n_pairs} held-out pairs; completion log-probs are per-token means (as in training); "
        f"margin = beta·(logp_c − logp_r) with beta = {s.get('beta')}; "
        f"[95% bootstrap CI, {s.get('bootstrap_samples')} resamples, seed {s.get('seed')}]; "
        "Δ has a paired bootstrap CI.",
    )
    corpus = s.get("corpus") or {}
    cnote = "chosen: exp(Σ NLL / Σ tokens) over the chosen completion tokens of the held-out pairs." if "perplexity/chosen" in ppl else ""
    if corpus:
        cnote += (" " if cnote else "") + (
            f"corpus: `{corpus.get('path')}`, {corpus.get('tokens')} tokens (cap {corpus.get('max_tokens')}), "
            f"sliding window {corpus.get('window')} / stride {corpus.get('stride')}."
        )
    table("Perplexity", ppl, cnote)
    if lm:
        tasks = report.get("lm_eval", {}).get("tasks", {})
        lines.extend(["## lm-evaluation-harness", ""])
        le = s.get("lm_eval", {})
        note = (
            f"lm-eval {report.get('lm_eval', {}).get('lm_eval_version') or ''}; limit = "
            f"{le.get('limit')} documents per task; value ± lm-eval stderr"
        )
        if any((deltas.get(k) or {}).get("ci95") for k in lm):
            note += (
                f"; Δ [95% paired bootstrap CI over the task's prompts, {s.get('bootstrap_samples')} resamples, "
                f"seed {s.get('seed')}] where lm-eval's per-prompt results are kept (IFEval: prompt level = mean of "
                "per-prompt all-followed, instruction level = followed / all instructions of the resampled prompts)"
            )
        if le.get("chat_template") or le.get("max_gen_toks"):
            note += f"; chat template {'on' if le.get('chat_template') else 'off'}, at most {le.get('max_gen_toks') or 'the task’s'} generated tokens"
        lines.append(note + ".")
        lines.append("")
        head = "| task | metric | version | n-shot | n | source | " + " | ".join(shown[m] for m in labels)
        head += " | Δ | |" if len(labels) == 2 else " |"
        lines.append(head)
        lines.append("|---" * (6 + len(labels) + (2 if len(labels) == 2 else 0)) + "|")
        for k in lm:
            _, task, metric = k.split("/", 2)
            ref = metrics["trained"].get(k) or next(metrics[m][k] for m in labels if k in metrics[m])
            info = tasks.get(task, {})
            src = "local: " + Path(info["data_file"]).name if info.get("local") and info.get("data_file") else "hub"
            if info.get("subset"):
                src += f" ({info['subset']})"
            row = [task, metric, str(ref.get("version")), _fmt(ref.get("n_shot")), _fmt(ref.get("n")), src]
            row += [_cell(metrics[m].get(k)) for m in labels]
            if len(labels) == 2:
                d = deltas.get(k)
                row += [_cell(d), _better(k, (d or {}).get("value"), _direction(k, ref))]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        lines.extend(lm_eval_examples_markdown(report))
    lines.extend(instruction_markdown(report))
    gens = report.get("generations") or []
    if gens:
        lines.extend(["## Generations (greedy)", ""])
        cols = ["prompt"] + [m for m in ("base", "trained") if m in gens[0]]
        lines.append("| " + " | ".join(shown.get(c, c) for c in cols) + " |")
        lines.append("|---" * len(cols) + "|")
        for g in gens:
            lines.append("| " + " | ".join(_esc(str(g.get(c, ""))) for c in cols) + " |")
        lines.append("")
    if report.get("curves"):
        lines.extend(["## Training curves", "", f"![training curves]({report['curves']})", ""])
    for note in report.get("notes") or []:
        lines.append(f"> {note}")
    return "\n".join(lines).rstrip() + "\n"


def _mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def instruction_markdown(report: dict[str, Any]) -> list[str]:
    """The "Instruction following" section of ``eval.md`` (also the Prefect artifact):
    prompt- and instruction-level strict accuracy per model with 95 % CIs, the paired
    delta with its CI, accuracy per instruction id, and a few answers side by side with
    pass/fail per constraint. Empty when the report has no instruction results."""
    info = report.get("instructions")
    if not info:
        return []
    metrics, deltas = report["metrics"], report.get("delta_details", {})
    labels = [m for m in ("base", "trained") if m in metrics]
    keys = [k for k in ("instructions/prompt_level_strict_acc", "instructions/inst_level_strict_acc") if any(k in metrics[m] for m in labels)]
    s = report.get("settings", {})
    lines = [
        "## Instruction following (held-out verifiable constraints)",
        "",
        f"{info['n_prompts']} held-out prompts ({info.get('source')}); greedy answers, chat template, "
        f"at most {info.get('max_new_tokens')} new tokens; checked by `orpo_core.data.synthetic.instructions` with IFEval's "
        "strict rules (prompt level: every instruction followed; instruction level: followed / all). "
        f"[95% bootstrap CI over prompts, {s.get('bootstrap_samples')} resamples, seed {s.get('seed')}]; "
        "Δ has a paired bootstrap CI (same prompts for both models).",
        "",
    ]
    two = len(labels) == 2
    lines.append("| metric | " + " | ".join(labels) + (" | Δ trained − base | |" if two else " |"))
    lines.append("|---" * (1 + len(labels) + (2 if two else 0)) + "|")
    for k in keys:
        row = [f"`{k}`"] + [_cell(metrics[m].get(k)) for m in labels]
        if two:
            d = deltas.get(k)
            row += [_cell(d), _better(k, (d or {}).get("value"), DIRECTIONS.get(k))]
        lines.append("| " + " | ".join(row) + " |")
    d = deltas.get("instructions/prompt_level_strict_acc") or {}
    if two and "wins" in d:
        lines.extend(["", f"Prompts followed fully by the trained model only: {d['wins']}; by the base model only: {d['losses']}."])
    per = info.get("per_instruction") or {}
    if per:
        lines.extend(["", "| instruction | prompts | " + " | ".join(m for m in labels if m in per) + " |"])
        lines.append("|---|---" + "|---" * sum(m in per for m in labels) + "|")
        for cid, n in (info.get("constraints") or {}).items():
            lines.append(f"| `{cid}` | {n} | " + " | ".join(_fmt(per[m].get(cid), 3) for m in labels if m in per) + " |")
    examples = info.get("examples") or []
    if examples:
        lines.extend(["", "### Answers side by side", ""])
        lines.extend(examples_markdown(examples, labels))
    lines.append("")
    return lines


def examples_markdown(examples: list[dict[str, Any]], labels: list[str]) -> list[str]:
    """Answers side by side (lines of markdown): per example its prompt, each model's answer and a
    ✓ / ✗ per instruction. ``examples``: the shape of
    :func:`orpo_core.evaluation.instruction_following.side_by_side` (``prompt``, ``constraints``
    ``[{"id", "kwargs"}]``, per model ``{"answer", "follow"}``, optional ``origin``)."""
    lines: list[str] = []
    for i, ex in enumerate(examples, 1):
        shown = [m for m in labels if m in ex]
        lines.append(f"**{i}.** {_esc(ex['prompt'])}")
        lines.append("")
        lines.append("| | " + " | ".join(shown) + " |")
        lines.append("|---" * (1 + len(shown)) + "|")
        lines.append("| answer | " + " | ".join(_esc(ex[m]["answer"]) for m in shown) + " |")
        for j, c in enumerate(ex["constraints"]):
            kw = ", ".join(f"{k}={v!r}" for k, v in c.get("kwargs", {}).items())
            name = f"`{c['id']}`" + (f" ({_esc(kw)})" if kw else "")
            lines.append(f"| {name} | " + " | ".join(_mark(ex[m]["follow"][j]) for m in shown) + " |")
        lines.append("")
    return lines


def lm_eval_examples_markdown(report: dict[str, Any]) -> list[str]:
    """The lm-eval answers side by side of ``eval.json["lm_eval"]["examples"]`` (IFEval documents,
    those where the models' strict verdicts differ first), one section per task; empty when none."""
    per_task = (report.get("lm_eval") or {}).get("examples") or {}
    labels = [m for m in ("base", "trained") if m in report.get("metrics", {})]
    lines: list[str] = []
    for task, examples in per_task.items():
        if not examples:
            continue
        lines += [f"### lm-eval `{task}`: answers side by side", "",
                  ("Google's IFEval checks (strict) on each answer, as lm-eval scored them; documents where the "
                   "models differ come first."), ""]
        lines += examples_markdown(examples, labels)
    return lines


def write_report(report: dict[str, Any], out_dir: str | os.PathLike, history: list[dict[str, Any]]) -> dict[str, str]:
    """Write ``curves.png`` (when ``history`` has curve entries), ``eval.md`` and ``eval.json``
    into a staging folder named after this process, then publish that folder as ``out_dir`` in
    one atomic exchange (:func:`orpo_core.io.staging_dir`): a reader sees the three files of one
    evaluation, never a new report with old numbers, also after a kill. Whatever else was in
    ``out_dir`` is replaced. Returns the written paths (under ``out_dir``)."""
    out = Path(out_dir)
    files: dict[str, str] = {}
    with staging_dir(out) as tmp:
        png = plot_curves(history, tmp / "curves.png") if history else None
        report["curves"] = "curves.png" if png else None
        if png:
            files["curves"] = str(out / "curves.png")
        atomic_write_text(tmp / "eval.md", render_markdown(report))
        files["eval_md"] = str(out / "eval.md")
        files["eval_json"] = str(out / "eval.json")
        report["files"] = {k: Path(v).name for k, v in files.items()}
        atomic_write_json(tmp / "eval.json", report)
    return files

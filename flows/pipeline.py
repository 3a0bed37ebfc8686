"""The ORPO pipeline flow and the push flow.

``orpo_pipeline`` chains prepare -> tokenize -> train -> evaluate -> [export] -> push
(export = GGUF files for llama.cpp when ``hub.gguf`` lists types, shipped in the Hub folder;
push = build the Hub folder; upload only when ``push`` / ``hub.push``). Every
stage is a cached Prefect task (:mod:`tasks`), so rerunning the same recipe
shows all stages as ``Cached`` and changing only ``orpo.beta`` reruns train and
evaluate but not the data stages. Parameters are JSON-serializable (recipe
path + ``section.key=value`` overrides), so the flows deploy as they are
(``prefect.yaml``).

Split pools: when ``ORPO_DATA_DEPLOYMENT`` names a deployment of
:func:`data_flow` (e.g. ``orpo-data/orpo-data-cpu`` on a CPU work pool), the
pipeline first runs the data stages there and waits; the local prepare /
tokenize tasks then find them cached (this needs a shared output folder and a
shared result storage, see ``tasks.common``), otherwise they simply run here.
"""

from __future__ import annotations

import contextlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from prefect import flow

from tasks import evaluate_task, export_task, prepare_task, push_task, tokenize_task, train_task
from tasks.common import json_safe, run_logger

KEY_METRICS = ("preference/accuracy", "preference/margin", "preference/log_odds", "perplexity/chosen", "perplexity/corpus")
PUBLISHED_RECORD = "published.json"


# --------------------------------------------------------------------------- helpers (shared by the flows)
def load(recipe: str, overrides: list[str] | None):
    """Load and validate the recipe (``orpo_core.config.load_recipe``); RecipeError on bad input."""
    from orpo_core.config import load_recipe

    return load_recipe(recipe, list(overrides or []))


def run_stage(task_obj, states: dict[str, str], name: str, **params: Any) -> dict[str, Any]:
    """Call a task, record its final state's name (``Completed`` / ``Cached``) and return its result.

    Raises the task's exception when it failed (after its retries).
    """
    state = task_obj(**params, return_state=True)
    states[name] = state.name
    return state.result()


def eval_metrics(eval_json: str | Path | None, which: str = "trained") -> dict[str, float]:
    """The key metrics of an eval.json for the trained (or base) model."""
    from orpo_core.model_card import extract_metrics, pick_label

    if not eval_json or not Path(eval_json).is_file():
        return {}
    metrics = extract_metrics(json.loads(Path(eval_json).read_text(encoding="utf-8")))
    label = pick_label(metrics, which)
    if label is None:
        return {}
    return {k: v.value for k, v in metrics[label].items()}


def write_published_record(out_dir: str | Path, recipe, eval_json: str | None, push_result: dict[str, Any]) -> Path:
    """Record what was published (repo, revision, url, metrics) in ``<run>/published.json`` (atomic)."""
    path = Path(out_dir) / PUBLISHED_RECORD
    record = {
        "repo_id": push_result.get("repo_id"),
        "revision": push_result.get("revision"),
        "url": push_result.get("url"),
        "gate_metric": recipe.eval.gate_metric,
        "gate_mode": recipe.eval.gate_mode,
        "metrics": eval_metrics(eval_json),
        "published_at": datetime.now(timezone.utc).isoformat(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(json_safe(record), indent=2), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _current_flow_run_id() -> str | None:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx is not None and ctx.flow_run is not None else None


def mark_abandoned_run_crashed(previous: dict[str, Any] | None) -> str | None:
    """Set the flow run recorded by a run that died holding the folder (``kill -9``, power loss)
    to *Crashed*, with its unfinished task runs, when the API still shows it unfinished.

    Returns the id of the flow run marked Crashed, or None (nothing to do / not found).
    """
    fid = (previous or {}).get("flow_run_id")
    if not fid or fid == _current_flow_run_id():
        return None
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    log = run_logger()
    message = (
        f"its process (pid {previous.get('pid')} on {previous.get('host')}) ended without finishing; "
        f"found by flow run {_current_flow_run_id()}"
    )
    with get_client(sync_client=True) as client:
        try:
            fr = client.read_flow_run(fid)
        except ObjectNotFound:
            return None
        if fr.state is not None and fr.state.is_final():
            return None
        for tr in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr.id]))):
            if tr.state is not None and not tr.state.is_final():
                client.set_task_run_state(tr.id, Crashed(message=message), force=True)
        client.set_flow_run_state(fr.id, Crashed(message=message), force=True)
    log.warning("flow run %s (%s) was abandoned: marked Crashed", fr.name, fid)
    return str(fid)


@contextlib.contextmanager
def run_folder(out_dir: str | Path) -> Iterator[None]:
    """Own the run folder for the block (:func:`tasks.run_lock.run_folder_lock`: a second run on it
    fails fast or waits, ``ORPO_RUN_LOCK_TIMEOUT_S``) and mark a run that died holding it Crashed."""
    from tasks.run_lock import run_folder_lock

    with run_folder_lock(out_dir, flow_run_id=_current_flow_run_id()) as previous:
        if previous:
            try:
                mark_abandoned_run_crashed(previous)
            except Exception as e:  # noqa: BLE001 - bookkeeping must not stop the rerun
                run_logger().warning("could not mark the abandoned flow run %s Crashed: %s", previous.get("flow_run_id"), e)
        yield


def _remote_data_prep(recipe: str, overrides: list[str] | None) -> str | None:
    name = os.environ.get("ORPO_DATA_DEPLOYMENT")
    if not name:
        return None
    from prefect.deployments import run_deployment

    log = run_logger()
    log.info("running the data stages on deployment %s", name)
    fr = run_deployment(name=name, parameters={"recipe": recipe, "overrides": list(overrides or [])}, timeout=None)
    if fr.state is None or not fr.state.is_completed():
        raise RuntimeError(f"data deployment {name} ended in state {fr.state.name if fr.state else None}")
    return fr.state.name


# --------------------------------------------------------------------------- flows
@flow(name="orpo-data", description="Data stages only (prepare + tokenize), for a CPU work pool.")
def data_flow(recipe: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run prepare and tokenize (tokenize only when the recipe names a model).

    Returns:
        ``{"run_name", "out_dir", "stages": {name: state}, "paths": {...}}``.

    Raises:
        tasks.run_lock.RunFolderBusy: another live run holds the run folder (a pipeline that
            calls this flow as its remote data stage does so before taking the folder).
    """
    r = load(recipe, overrides)
    d = r.to_dict()
    out = r.out_dir
    states: dict[str, str] = {}
    with run_folder(out):
        prep = run_stage(prepare_task, states, "prepare", recipe=d, out_dir=str(out / "data"))
        paths = {"data": prep["path"]}
        if r.model is not None:
            tok = run_stage(tokenize_task, states, "tokenize", recipe=d, data_dir=prep["path"], out_dir=str(out / "tokenized"))
            paths["tokenized"] = tok["path"]
    return {"run_name": r.run_name, "out_dir": str(out), "stages": states, "paths": paths}


@flow(name="orpo-pipeline", description="prepare -> tokenize -> train (ORPO) -> evaluate -> push")
def orpo_pipeline(recipe: str, overrides: list[str] | None = None, push: bool | None = None) -> dict[str, Any]:
    """Run the whole pipeline for one recipe.

    Args:
        recipe: path of the recipe YAML (relative to the working directory).
        overrides: ``section.key=value`` overrides applied before validation.
        push: upload to the Hub (None: the recipe's ``hub.push``). The Hub folder is
            always built (dry run when not pushing).

    Returns:
        ``{"run_name", "out_dir", "stages": {stage: "Completed"|"Cached"}, "paths": {...},
        "metrics": {key metrics of the trained model}, "gate": {"metric", "value"},
        "train_metrics", "push": {...}}``.

    Raises:
        orpo_core.config.RecipeError: invalid recipe; any stage's error after its retries.
        tasks.run_lock.RunFolderBusy: another live run holds the run folder.
    """
    r = load(recipe, overrides)
    d = r.to_dict()
    out = r.out_dir
    log = run_logger()
    log.info("run %s -> %s", r.run_name, out)
    states: dict[str, str] = {}
    remote = _remote_data_prep(recipe, overrides)
    if remote:
        states["remote_data"] = remote
    with run_folder(out):
        return _pipeline_stages(r, d, out, states, push)


def _pipeline_stages(r, d: dict[str, Any], out: Path, states: dict[str, str], push: bool | None) -> dict[str, Any]:
    """The stages of :func:`orpo_pipeline`, run while the flow holds the run folder."""
    log = run_logger()
    prep = run_stage(prepare_task, states, "prepare", recipe=d, out_dir=str(out / "data"))
    result: dict[str, Any] = {"run_name": r.run_name, "out_dir": str(out), "stages": states, "paths": {"data": prep["path"]}}
    if r.model is None:
        log.info("data-only recipe (no model section): stopping after prepare")
        return result
    tok = run_stage(tokenize_task, states, "tokenize", recipe=d, data_dir=prep["path"], out_dir=str(out / "tokenized"))
    tr = run_stage(train_task, states, "train", recipe=d, tokenized_dir=tok["path"], out_dir=str(out / "train"))
    ev = run_stage(
        evaluate_task,
        states,
        "evaluate",
        recipe=d,
        model_dir=tr["model_dir"],
        tokenized_dir=tok["path"],
        out_dir=str(out / "eval"),
    )
    gguf_files = None
    if r.hub.gguf:
        ex = run_stage(
            export_task, states, "export", recipe=d, model_dir=tr["model_dir"], out_dir=str(out / "export"), quantizations=list(r.hub.gguf)
        )
        gguf_files = ex["files"]
        result["paths"]["export"] = ex["path"]
    do_push = r.hub.push if push is None else bool(push)
    pu = run_stage(
        push_task,
        states,
        "push",
        recipe=d,
        model_dir=tr["model_dir"],
        eval_json=ev["eval_json"],
        out_dir=str(out / "hub"),
        dry_run=not do_push,
        gguf_files=gguf_files,
    )
    if pu.get("pushed"):
        write_published_record(out, r, ev["eval_json"], pu)
    metrics = eval_metrics(ev["eval_json"])
    result["paths"].update(
        tokenized=tok["path"], train=tr["path"], model=tr["model_dir"], eval=ev["path"], eval_json=ev["eval_json"], hub=pu["folder"]
    )
    result.update(
        metrics={k: metrics[k] for k in KEY_METRICS if k in metrics},
        gate=ev.get("gate"),
        train_metrics=tr.get("metrics"),
        push={k: pu.get(k) for k in ("repo_id", "revision", "dry_run", "pushed", "url")},
    )
    return json_safe(result)


@flow(name="orpo-export", description="Write the trained model of a run as GGUF files for llama.cpp.")
def export_flow(recipe: str, quantizations: list[str], overrides: list[str] | None = None) -> dict[str, Any]:
    """Export ``<run>/train/model`` to ``<run>/export/<run_name>.<TYPE>.gguf`` (cached Prefect task).

    Args:
        quantizations: GGUF types (``f32``, ``f16``, ``q8_0``).

    Returns:
        ``{"stages": {"export": state}, "path", "files": [...]}``.

    Raises:
        orpo_core.gguf_export.GGUFExportError: no trained model, unsupported architecture or type.
    """
    from orpo_core.gguf_export import GGUFExportError, parse_quantizations

    r = load(recipe, overrides)
    out = r.out_dir
    model_dir = out / "train" / "model"
    if not model_dir.is_dir():
        raise GGUFExportError(f"no trained model in {model_dir}: run `orpo train` or `orpo run` first")
    qs = parse_quantizations(quantizations)
    if not qs:
        raise GGUFExportError("no GGUF type given (--gguf f16,q8_0)")
    states: dict[str, str] = {}
    with run_folder(out):
        ex = run_stage(export_task, states, "export", recipe=r.to_dict(), model_dir=str(model_dir), out_dir=str(out / "export"), quantizations=qs)
    return json_safe({**ex, "stages": states})


@flow(name="orpo-push", description="Build the Hub folder of a trained run and upload it (or dry run).")
def push_flow(recipe: str, overrides: list[str] | None = None, dry_run: bool | None = None) -> dict[str, Any]:
    """Publish ``<run>/train/model`` with its model card (metrics from ``<run>/eval/eval.json`` when present).

    Args:
        dry_run: only write ``<run>/hub`` (None: ``not hub.push``).

    Raises:
        orpo_core.hub.HubError: no trained model, invalid repo id, no token.
    """
    from orpo_core.hub import HubError

    r = load(recipe, overrides)
    out = r.out_dir
    model_dir = out / "train" / "model"
    if not model_dir.is_dir():
        raise HubError(f"no trained model in {model_dir}: run `orpo train` or `orpo run` first")
    eval_json = out / "eval" / "eval.json"
    dry = (not r.hub.push) if dry_run is None else bool(dry_run)
    states: dict[str, str] = {}
    gguf_files = None
    if r.hub.gguf:
        ex = run_stage(
            export_task, states, "export", recipe=r.to_dict(), model_dir=str(model_dir), out_dir=str(out / "export"),
            quantizations=list(r.hub.gguf),
        )
        gguf_files = ex["files"]
    pu = run_stage(
        push_task,
        states,
        "push",
        recipe=r.to_dict(),
        model_dir=str(model_dir),
        eval_json=str(eval_json) if eval_json.is_file() else None,
        out_dir=str(out / "hub"),
        dry_run=dry,
        gguf_files=gguf_files,
    )
    if pu.get("pushed"):
        write_published_record(out, r, str(eval_json) if eval_json.is_file() else None, pu)
    return json_safe({**pu, "stages": states})

"""The ORPO pipeline flow and the push flow.

``orpo_pipeline`` chains [generate] -> prepare -> tokenize -> train -> evaluate -> [export] -> push
(generate = on-policy pairs from the base model, for recipes with an ``onpolicy`` source;
export = GGUF files for llama.cpp when ``hub.gguf`` lists types, shipped in the Hub folder;
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
shared result storage, see ``tasks.options``), otherwise they simply run here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow

from orpo_core.io import json_safe

from flows.runs import (
    eval_metrics,
    export_and_push,
    flow_run_namer,
    load,
    mark_unfinished_progress,
    publish_run_summary,
    run_folder,
    run_stage,
    tag_flow_run,
    write_published_record,
)
from tasks import evaluate_task, export_task, generate_task, prepare_task, push_task, tokenize_task, train_task
from tasks.logs import run_logger

KEY_METRICS = ("preference/accuracy", "preference/margin", "preference/log_odds", "perplexity/chosen", "perplexity/corpus")


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


def _has_onpolicy(r) -> bool:
    from orpo_core.data.onpolicy import onpolicy_source

    return onpolicy_source(r) is not None


# --------------------------------------------------------------------------- flows
@flow(name="orpo-data", flow_run_name=flow_run_namer("data"), description="Data stages only (prepare + tokenize), for a CPU work pool.")
def data_flow(recipe: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run prepare and tokenize (tokenize only when the recipe names a model).

    Returns:
        ``{"run_name", "out_dir", "stages": {name: state}, "paths": {...}}``.

    Raises:
        orpo_core.runs.lock.RunFolderBusy: another live run holds the run folder (a pipeline that
            calls this flow as its remote data stage does so before taking the folder).
    """
    r = load(recipe, overrides)
    d = r.to_dict()
    out = r.out_dir
    states: dict[str, str] = {}
    tag_flow_run(f"recipe={r.run_name}", "flow=data")
    with run_folder(out):
        paths = {}
        if _has_onpolicy(r):
            paths["onpolicy"] = run_stage(generate_task, states, "generate", recipe=d, out_dir=str(out / "onpolicy"))["path"]
        prep = run_stage(prepare_task, states, "prepare", recipe=d, out_dir=str(out / "data"))
        paths["data"] = prep["path"]
        if r.model is not None:
            tok = run_stage(tokenize_task, states, "tokenize", recipe=d, data_dir=prep["path"], out_dir=str(out / "tokenized"))
            paths["tokenized"] = tok["path"]
    return {"run_name": r.run_name, "out_dir": str(out), "stages": states, "paths": paths}


@flow(name="orpo-pipeline", flow_run_name=flow_run_namer(), description="prepare -> tokenize -> train (ORPO) -> evaluate -> push")
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
        "train_metrics", "push": {...}}``. The flow run is named ``<run_name>-<UTC time>`` and
        tagged ``recipe=<run_name>``, ``flow=pipeline`` (task runs: ``stage=<stage>``); it ends
        with the ``<run>-summary`` markdown artifact (stage states with links to the flow runs
        that produced cached stages, output folder, base / trained / change with 95 % intervals,
        loss curves), cached or not.

    Raises:
        orpo_core.config.RecipeError: invalid recipe; any stage's error after its retries.
        orpo_core.runs.lock.RunFolderBusy: another live run holds the run folder.
    """
    r = load(recipe, overrides)
    d = r.to_dict()
    out = r.out_dir
    log = run_logger()
    log.info("run %s -> %s", r.run_name, out)
    tag_flow_run(f"recipe={r.run_name}", "flow=pipeline")
    states: dict[str, str] = {}
    remote = _remote_data_prep(recipe, overrides)
    if remote:
        states["remote_data"] = remote
    with run_folder(out):
        return _pipeline_stages(r, d, out, states, push)


def _pipeline_stages(r, d: dict[str, Any], out: Path, states: dict[str, str], push: bool | None) -> dict[str, Any]:
    """The stages of :func:`orpo_pipeline`, run while the flow holds the run folder."""
    log = run_logger()
    if r.model is not None:
        from orpo_core.data.context_length import check_max_length

        check_max_length(r)  # data.max_length vs the model's context length, before any stage writes
    from tasks.artifacts import artifact_key

    mark_unfinished_progress(artifact_key(r.run_name, "training-progress"))
    gen = None
    if _has_onpolicy(r):  # on-policy pairs from the base model, before prepare reads them
        gen = run_stage(generate_task, states, "generate", recipe=d, out_dir=str(out / "onpolicy"))
    prep = run_stage(prepare_task, states, "prepare", recipe=d, out_dir=str(out / "data"))
    result: dict[str, Any] = {"run_name": r.run_name, "out_dir": str(out), "stages": states, "paths": {"data": prep["path"]}}
    if gen is not None:
        result["paths"]["onpolicy"] = gen["path"]
    if r.model is None:
        log.info("data-only recipe (no model section): stopping after prepare")
        publish_run_summary(r, out, states, {"prepare": prep}, None, None)
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
    do_push = r.hub.push if push is None else bool(push)
    pu, ex = export_and_push(states, r, d, out, tr["model_dir"], ev["eval_json"], dry_run=not do_push,
                             export_task=export_task, push_task=push_task)
    if ex is not None:
        result["paths"]["export"] = ex["path"]
    results = {"prepare": prep, "tokenize": tok, "train": tr, "evaluate": ev, "push": pu} | ({"generate": gen} if gen else {})
    publish_run_summary(r, out, states, results, ev["eval_json"], tr.get("metrics"))
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


@flow(name="orpo-export", flow_run_name=flow_run_namer("export"), description="Write the trained model of a run as GGUF files for llama.cpp.")
def export_flow(recipe: str, quantizations: list[str], overrides: list[str] | None = None) -> dict[str, Any]:
    """Export ``<run>/train/model`` to ``<run>/export/<run_name>.<TYPE>.gguf`` (cached Prefect task).

    Args:
        quantizations: GGUF types (``f32``, ``f16``, ``q8_0``).

    Returns:
        ``{"stages": {"export": state}, "path", "files": [...]}``.

    Raises:
        orpo_core.publish.gguf.GGUFExportError: no trained model, unsupported architecture or type.
    """
    from orpo_core.publish.gguf import GGUFExportError, parse_quantizations

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


@flow(name="orpo-push", flow_run_name=flow_run_namer("push"), description="Build the Hub folder of a trained run and upload it (or dry run).")
def push_flow(recipe: str, overrides: list[str] | None = None, dry_run: bool | None = None) -> dict[str, Any]:
    """Publish ``<run>/train/model`` with its model card (metrics from ``<run>/eval/eval.json`` when present).

    Args:
        dry_run: only write ``<run>/hub`` (None: ``not hub.push``).

    Raises:
        orpo_core.publish.hub.HubError: no trained model, invalid repo id, no token, offline mode.
        orpo_core.runs.lock.RunFolderBusy: another live run holds the run folder.
    """
    from orpo_core.publish.hub import HubError

    r = load(recipe, overrides)
    out = r.out_dir
    model_dir = out / "train" / "model"
    no_model = HubError(f"no trained model in {model_dir}: run `orpo train` or `orpo run` first")
    if not model_dir.is_dir():
        raise no_model  # before the lock: nothing is created
    with run_folder(out):  # not while a run rewrites the model or the eval it publishes
        if not model_dir.is_dir():
            raise no_model
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

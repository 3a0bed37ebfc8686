"""What the flows share: loading the recipe, running a stage and recording its state, reading an
eval.json's metrics, the published record, and owning a run folder (lock + crash bookkeeping)."""

from __future__ import annotations

import contextlib
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from orpo_core.io import atomic_write_json
from tasks.logs import run_logger

PUBLISHED_RECORD = "published.json"


def load(recipe: str, overrides: list[str] | None):
    """Load and validate the recipe (``orpo_core.config.load_recipe``); RecipeError on bad input."""
    from orpo_core.config import load_recipe

    return load_recipe(recipe, list(overrides or []))


def run_stage(task_obj, states: dict[str, str], name: str, **params: Any) -> dict[str, Any]:
    """Call a task, record its final state's name (``Completed`` / ``Cached``) and return its result.

    The task run is tagged ``stage=<stage>`` (the part of ``name`` before a ``:``).
    Raises the task's exception when it failed (after its retries).
    """
    from prefect import tags

    with tags(f"stage={name.split(':')[0]}"):
        state = task_obj(**params, return_state=True)
    states[name] = state.name
    return state.result()


def export_and_push(states: dict[str, str], r, d: dict[str, Any], out: Path, model_dir: str, eval_json: str, *,
                    dry_run: bool, export_task, push_task) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The publishing stages of a run: GGUF export (only when the recipe's ``hub.gguf`` names
    types) into ``<out>/export``, then the hub folder / upload into ``<out>/hub``; a real upload
    is recorded in ``<out>/published.json``.

    Args:
        r, d: the loaded recipe and its dict (the tasks' ``recipe`` parameter).
        export_task, push_task: the task objects (each flow passes its module's own, so tests can
            change their retry options).

    Returns:
        ``(push result, export result or None)``. Raises what the tasks raise after their retries.
    """
    ex = None
    if r.hub.gguf:  # GGUF files shipped with the model (orpo_core.publish.gguf)
        ex = run_stage(export_task, states, "export", recipe=d, model_dir=model_dir, out_dir=str(out / "export"),
                       quantizations=list(r.hub.gguf))
    pu = run_stage(push_task, states, "push", recipe=d, model_dir=model_dir, eval_json=eval_json, out_dir=str(out / "hub"),
                   dry_run=dry_run, gguf_files=ex["files"] if ex else None)
    if pu.get("pushed"):
        write_published_record(out, r, eval_json, pu)
    return pu, ex


def eval_metrics(eval_json: str | Path | None, which: str = "trained") -> dict[str, float]:
    """The key metrics of an eval.json for the trained (or base) model."""
    from orpo_core.evaluation.results import extract_metrics, pick_label

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
    return atomic_write_json(path, record)


# --------------------------------------------------------------------------- finding runs
def _timestamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


def recipe_run_name(recipe: Any, overrides: Any = None) -> str:
    """The recipe's ``run_name`` (with ``overrides`` applied), or the recipe file's stem when it
    does not load (the flow itself then reports the error)."""
    try:
        return load(str(recipe), list(overrides or [])).run_name
    except Exception:  # noqa: BLE001 - a name must not fail the run; the flow raises the real error
        return Path(str(recipe)).stem or "orpo"


def flow_run_namer(kind: str = ""):
    """A ``flow_run_name=`` callable: ``<run_name>[-<kind>]-<UTC yyyymmdd-hhmmss>`` from the flow
    run's ``recipe`` / ``overrides`` parameters (e.g. ``quickstart-20261205-131500``,
    ``quickstart-sweep-20261205-131500``)."""

    def name() -> str:
        from prefect.runtime import flow_run

        params = flow_run.parameters or {}
        base = recipe_run_name(params.get("recipe", "orpo"), params.get("overrides"))
        return "-".join(x for x in (base, kind, _timestamp()) if x)

    name.__name__ = f"flow_run_name_{kind or 'run'}"
    return name


def tag_flow_run(*new_tags: str) -> list[str]:
    """Add ``new_tags`` to the running flow run's tags (API update; the UI filters on them).

    Returns the flow run's tags after the update (empty outside a flow run). Failures only warn.
    """
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return []
    tags = list(dict.fromkeys([*(ctx.flow_run.tags or []), *new_tags]))
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            client.update_flow_run(ctx.flow_run.id, tags=tags)
        ctx.flow_run.tags = tags
    except Exception as e:  # noqa: BLE001 - tags help finding runs; they never stop one
        run_logger().warning("could not tag flow run %s with %s: %s", ctx.flow_run.id, new_tags, e)
    return tags


def flow_run_url(flow_run_id: str) -> str:
    """The UI address of a flow run: ``PREFECT_UI_URL/runs/flow-run/<id>``, or the path alone
    (``/runs/flow-run/<id>``, resolved by the UI page the link is shown on) without a UI URL."""
    try:
        from prefect.settings import PREFECT_UI_URL

        ui = PREFECT_UI_URL.value()
    except Exception:  # noqa: BLE001
        ui = None
    return f"{(ui or '').rstrip('/')}/runs/flow-run/{flow_run_id}"


def stage_lines(states: dict[str, str], results: dict[str, dict[str, Any] | None]):
    """:class:`tasks.ui.StageLine` per recorded stage: its state and, for a Cached one, the flow
    run that produced the result (``result["produced_by"]``, written by :func:`tasks.stage.stage_run`)."""
    from tasks.ui import StageLine

    lines = []
    for name, state in states.items():
        prod = (results.get(name) or {}).get("produced_by") or {}
        fid = prod.get("flow_run_id")
        lines.append(StageLine(name, state, prod.get("flow_run_name") or fid, flow_run_url(fid) if fid else None))
    return lines


def publish_run_summary(r, out_dir: Path, states: dict[str, str], results: dict[str, Any], eval_json: str | None,
                        train_metrics: dict[str, Any] | None) -> str:
    """Create the ``<run>-summary`` markdown artifact (:func:`tasks.ui.run_summary_markdown`) and
    return its markdown."""
    from tasks.artifacts import artifact_key, markdown_artifact
    from tasks.ui import run_summary_markdown

    data = None
    if eval_json and Path(eval_json).is_file():
        data = json.loads(Path(eval_json).read_text(encoding="utf-8"))
    curves = Path(eval_json).parent / "curves.png" if eval_json else None
    md = run_summary_markdown(
        r.run_name,
        out_dir,
        stage_lines(states, results),
        data,
        gate_metric=r.eval.gate_metric,
        gate_mode=r.eval.gate_mode,
        train_metrics=train_metrics,
        curves=curves if curves is not None and curves.is_file() else None,
    )
    cached = sum(1 for s in states.values() if s == "Cached")
    markdown_artifact(md, artifact_key(r.run_name, "summary"),
                      f"Run summary of {r.run_name}: {len(states)} stages, {cached} cached; results with 95 % intervals")
    return md


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
    mark_unfinished_progress(flow_run_ids=[str(fid)])
    return str(fid)


# --------------------------------------------------------------------------- abandoned progress
_STEP_RE = re.compile(r"\|\s*step\s*\|\s*(\d+)(?:\s*/\s*(\d+))?\s*\|")
_MARK_RE = re.compile(r"\A\*\*[A-Z]+ at ")


def abandoned_progress_description(description: str | None, state_name: str, progress: float | None = None,
                                   flow_run_name: str | None = None) -> str:
    """The description of a training-progress artifact whose flow run ended (``state_name``:
    Crashed, Cancelled, Failed) before training finished: prefixed with
    ``**CRASHED at step N / M**`` (the step read from the progress table, else the percentage).
    A description that already carries such a mark is returned unchanged."""
    text = description or ""
    if _MARK_RE.match(text):
        return text
    m = _STEP_RE.search(text)
    if m:
        where = f"step {m.group(1)} / {m.group(2)}" if m.group(2) else f"step {m.group(1)}"
    else:
        where = f"{progress:.0f} %" if progress is not None else "an unknown step"
    who = f"flow run {flow_run_name}" if flow_run_name else "its flow run"
    return f"**{state_name.upper()} at {where}**: {who} ended {state_name} before training finished.\n\n{text}"


def mark_unfinished_progress(key: str | None = None, flow_run_ids: list[str] | None = None) -> list[str]:
    """Mark training-progress artifacts whose flow run ended unfinished (Crashed, Cancelled,
    Failed) below 100 %: their description gets :func:`abandoned_progress_description`'s prefix.

    Looks at the latest progress artifact with ``key`` and/or every progress artifact of
    ``flow_run_ids``. An artifact of a flow run still running, or completed, is left alone.
    Called at a run's start (a killed run cannot update its own artifact). Returns the ids of
    the artifacts marked; API errors only warn (outside a Prefect run: nothing to do).
    """
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return []
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactUpdate
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey, ArtifactFilterType
    from prefect.client.schemas.sorting import ArtifactSort

    marked: list[str] = []
    try:
        with get_client(sync_client=True) as client:
            found = []
            if key:
                found += client.read_artifacts(
                    artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]), type=ArtifactFilterType(any_=["progress"])),
                    sort=ArtifactSort.CREATED_DESC,
                    limit=1,
                )
            if flow_run_ids:
                found += client.read_artifacts(
                    artifact_filter=ArtifactFilter(
                        flow_run_id=ArtifactFilterFlowRunId(any_=list(flow_run_ids)), type=ArtifactFilterType(any_=["progress"])
                    )
                )
            current = _current_flow_run_id()
            for art in {a.id: a for a in found}.values():
                if art.flow_run_id is None or str(art.flow_run_id) == current or _MARK_RE.match(art.description or ""):
                    continue
                try:
                    progress = float(art.data)
                except (TypeError, ValueError):
                    progress = None
                if progress is not None and progress >= 100.0:
                    continue
                fr = client.read_flow_run(art.flow_run_id)
                state = fr.state
                if state is None or not state.is_final() or state.is_completed():
                    continue
                desc = abandoned_progress_description(art.description, state.name, progress, fr.name)
                client.update_artifact(art.id, ArtifactUpdate(description=desc))
                marked.append(str(art.id))
                run_logger().warning("training progress %s of flow run %s marked %s", art.key, fr.name, state.name)
    except Exception as e:  # noqa: BLE001 - bookkeeping must not stop the rerun
        run_logger().warning("could not check the training-progress artifacts (%s): %s", key or flow_run_ids, e)
    return marked


@contextlib.contextmanager
def run_folder(out_dir: str | Path) -> Iterator[None]:
    """Own the run folder for the block (:func:`orpo_core.runs.lock.run_folder_lock`: a second run on it
    fails fast or waits, ``ORPO_RUN_LOCK_TIMEOUT_S``) and mark a run that died holding it Crashed."""
    from orpo_core.runs.lock import run_folder_lock

    with run_folder_lock(out_dir, flow_run_id=_current_flow_run_id()) as previous:
        if previous:
            try:
                mark_abandoned_run_crashed(previous)
            except Exception as e:  # noqa: BLE001 - bookkeeping must not stop the rerun
                run_logger().warning("could not mark the abandoned flow run %s Crashed: %s", previous.get("flow_run_id"), e)
        yield

"""What the flows share: loading the recipe, running a stage and recording its state, reading an
eval.json's metrics, the published record, and owning a run folder (lock + crash bookkeeping)."""

from __future__ import annotations

import contextlib
import json
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

    Raises the task's exception when it failed (after its retries).
    """
    state = task_obj(**params, return_state=True)
    states[name] = state.name
    return state.result()


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

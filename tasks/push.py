"""Prefect task: build the Hub folder (model card, weights, tokenizer) and upload it.

The Hugging Face token is resolved *inside* the task (:func:`resolve_hf_token`:
``HF_TOKEN`` / ``HUGGING_FACE_HUB_TOKEN``, else the Prefect Secret block named by
``ORPO_HF_TOKEN_BLOCK`` (default ``hf-token``), else the token saved by
``hf auth login``). It is never a task or flow parameter, never part of the
task result, never cached (this task has no cache), and log records passing
through the run's handlers while the task runs have it replaced by
``<redacted>``.

Retries: only transient errors (timeouts, connection errors, HTTP 429 / 5xx),
decided by :func:`retry_on_transient` (``retry_condition_fn``); an invalid repo
id, a missing token or 401/403/404 fail at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator

from prefect import task
from prefect.cache_policies import NO_CACHE

from .artifacts import artifact_key, markdown_artifact

from .logs import run_logger

from .options import load_recipe_dict, retry_options, state_exception


def resolve_hf_token() -> str | None:
    """The Hub token: env ``HF_TOKEN`` / ``HUGGING_FACE_HUB_TOKEN``, the Prefect Secret block
    ``ORPO_HF_TOKEN_BLOCK`` (default ``hf-token``), or huggingface_hub's saved login; else None."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(name):
            return os.environ[name]
    block = os.environ.get("ORPO_HF_TOKEN_BLOCK", "hf-token")
    if block:
        try:
            from prefect.blocks.system import Secret

            value = Secret.load(block, _sync=True).get()
            if value:
                return str(value)
        except Exception:  # noqa: BLE001 - no such block / no server: fall through
            pass
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001
        return None


class _RedactFilter(logging.Filter):
    def __init__(self, secret: str):
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001
            return True
        if self.secret in msg:
            record.msg = msg.replace(self.secret, "<redacted>")
            record.args = ()
        return True


@contextlib.contextmanager
def redact_logs(secret: str | None) -> Iterator[None]:
    """Replace ``secret`` by ``<redacted>`` in every record handled by the root, Prefect and
    huggingface_hub loggers' handlers during the block."""
    if not secret:
        yield
        return
    f = _RedactFilter(secret)
    handlers: set[logging.Handler] = set()
    for name in ("", "prefect", "prefect.task_runs", "prefect.flow_runs", "huggingface_hub", "orpo_core"):
        handlers.update(logging.getLogger(name).handlers)
    loggers = [logging.getLogger(n) for n in ("huggingface_hub", "orpo_core", "prefect.task_runs", "prefect.flow_runs")]
    for h in handlers:
        h.addFilter(f)
    for lg in loggers:
        lg.addFilter(f)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(f)
        for lg in loggers:
            lg.removeFilter(f)


def retry_on_transient(task, task_run, state) -> bool:
    """``retry_condition_fn``: retry only timeouts, connection errors and HTTP 429 / 5xx."""
    from orpo_core.publish.hub import is_transient_error

    exc = state_exception(state)
    return exc is not None and is_transient_error(exc)


_push_retries = retry_options(default_retries=3)


@task(
    name="push",
    cache_policy=NO_CACHE,
    persist_result=False,
    retry_condition_fn=retry_on_transient,
    description="Build the Hub folder and upload it (dry run: build only).",
    **_push_retries,
)
def push_task(
    recipe: dict[str, Any],
    model_dir: str,
    eval_json: str | None,
    out_dir: str,
    dry_run: bool = True,
    gguf_files: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Build ``out_dir`` (``<run>/hub``) from the trained model and, unless ``dry_run``, upload it.

    ``gguf_files``: the export stage's files (``hub.gguf``), shipped in the folder and listed in the card.

    Returns:
        ``{"stage": "push", "folder", "repo_id", "revision", "dry_run", "pushed", "url", "files"}``
        (never the token).

    Raises:
        orpo_core.publish.hub.HubError: invalid repo id, missing model files, no token (not retried).
        orpo_core.publish.hub.HubPushError: the upload failed (retried when transient).
    """
    from orpo_core.publish.hub import build_hub_folder, push_folder, refuse_offline_upload, validate_repo_id

    r = load_recipe_dict(recipe)
    log = run_logger()
    if not dry_run:
        validate_repo_id(r.hub.repo_id)
        refuse_offline_upload()  # HF_HUB_OFFLINE=1: fail before building anything (HubError, never retried)
    elif r.hub.repo_id:
        validate_repo_id(r.hub.repo_id)
    token = None if dry_run else resolve_hf_token()
    secrets = (token,) if token else ()
    with redact_logs(token):
        folder = build_hub_folder(
            r, Path(model_dir), Path(eval_json) if eval_json else None, Path(out_dir), secrets=secrets, gguf_files=gguf_files or ()
        )
        from orpo_core.publish.card import card_for_ui

        card = (folder / "README.md").read_text(encoding="utf-8")
        from .ui import png_data_uri

        curves = png_data_uri(folder / "training_curves.png", max_width_px=700)  # the card is long already: a lighter image
        images = {"training_curves.png": curves} if curves else None
        markdown_artifact(card_for_ui(card, images), artifact_key(r.run_name, "model-card"), f"Model card of {r.run_name} ({folder / 'README.md'})")
        files = sorted(p.name for p in folder.iterdir())
        url = None
        if dry_run:
            log.info("dry run: the folder that would be uploaded to %s is %s", r.hub.repo_id, folder)
        else:
            url = push_folder(folder, r.hub, token)
            log.info("uploaded %s to %s", folder, url)
    return {
        "stage": "push",
        "folder": str(folder),
        "repo_id": r.hub.repo_id,
        "revision": r.hub.revision,
        "dry_run": bool(dry_run),
        "pushed": not dry_run,
        "url": url,
        "files": files,
    }


@task(name="last-published", cache_policy=NO_CACHE, persist_result=False, retries=0)
def last_published_task(recipe: dict[str, Any], record_path: str) -> dict[str, Any]:
    """Metrics of the last published model: the Hub model card's model-index when reachable
    (authoritative), else the local record ``record_path`` (``<run>/published.json``).

    Returns:
        ``{"metrics": {name: value} | None, "source": "hub" | "record" | None, "record": {...} | None}``
        (the token used to read a private card is resolved here and never returned).
    """
    import json

    from orpo_core.publish.hub import read_published_metrics

    r = load_recipe_dict(recipe)
    record = None
    p = Path(record_path)
    if p.is_file():
        try:
            record = json.loads(p.read_text(encoding="utf-8"))
        except ValueError:
            run_logger().warning("ignoring unreadable publication record %s", p)
    hub_metrics = None
    if r.hub.repo_id:
        token = resolve_hf_token()
        with redact_logs(token):
            hub_metrics = read_published_metrics(r.hub.repo_id, token=token, revision=r.hub.revision)
    if hub_metrics:
        return {"metrics": hub_metrics, "source": "hub", "record": record}
    if record and record.get("metrics"):
        return {"metrics": record["metrics"], "source": "record", "record": record}
    return {"metrics": None, "source": None, "record": record}

"""Publishing a trained model to the Hugging Face Hub (no Prefect here).

Two steps, so that a dry run produces exactly what would be uploaded:

1. :func:`build_hub_folder` assembles the upload folder: the model's
   safetensors weights (or LoRA adapter) and configs, the tokenizer files with
   the chat template, ``README.md`` (the model card, see
   :mod:`orpo_core.publish.card`), ``orpo_recipe.yaml`` (secrets stripped),
   ``eval_results.json`` and ``training_curves.png`` when present, and the GGUF exports
   (``hub.gguf``, :mod:`orpo_core.publish.gguf`). Files are
   hard-linked when possible (no copy of multi-GB weights), copied otherwise.
   The folder is built in a temp folder next to ``out_dir`` and renamed into
   place, so it is never half written.
2. :func:`push_folder` creates the repo (``HfApi.create_repo(exist_ok=True)``),
   the branch when ``hub.revision`` is set, and uploads the folder in one commit
   (``HfApi.upload_folder``).

The token is an argument: callers resolve it (``HF_TOKEN`` or a Prefect Secret
block in the tasks layer) and it is only ever handed to ``HfApi``. It is never
logged, written or put in an exception message (messages are redacted).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Mapping, Sequence

from huggingface_hub import HfApi

from orpo_core.config import HubConfig, Recipe
from orpo_core.io import make_owned_temp_dir, replace_dir

logger = logging.getLogger(__name__)

# files of a model folder that belong on the Hub (weights must be safetensors: pickles are never uploaded)
MODEL_FILE_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "adapter_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "*.tiktoken",
)
EXCLUDED_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt", "training_args*", "optimizer*", "scheduler*", "rng_state*")
CARD_NAME = "README.md"
RECIPE_NAME = "orpo_recipe.yaml"
EVAL_NAME = "eval_results.json"
CURVES_NAME = "training_curves.png"


class HubError(ValueError):
    """Bad publishing input: invalid repo id, missing model files, push without a repo or token."""


def validate_repo_id(repo_id: str | None) -> str:
    """Check a model repo id (``namespace/name``, Hub naming rules).

    Raises:
        HubError: None, no namespace, or characters the Hub rejects.
    """
    from huggingface_hub.utils import HFValidationError
    from huggingface_hub.utils import validate_repo_id as _validate

    if not repo_id:
        raise HubError("hub.repo_id is not set (expected 'namespace/name')")
    try:
        _validate(repo_id)
    except HFValidationError as e:
        raise HubError(f"invalid hub.repo_id {repo_id!r}: {e}") from None
    if repo_id.count("/") != 1:
        raise HubError(f"invalid hub.repo_id {repo_id!r}: expected 'namespace/name'")
    return repo_id


def _is_model_file(name: str) -> bool:
    if any(fnmatch.fnmatch(name, p) for p in EXCLUDED_PATTERNS):
        return False
    return any(fnmatch.fnmatch(name, p) for p in MODEL_FILE_PATTERNS)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def model_files(model_dir: str | Path) -> list[Path]:
    """The files of ``model_dir`` that are uploaded (weights, configs, tokenizer).

    Raises:
        HubError: the folder does not exist, has no ``config.json`` /
            ``adapter_config.json``, or has no ``*.safetensors`` weights.
    """
    d = Path(model_dir)
    if not d.is_dir():
        raise HubError(f"model folder {d} does not exist (train the model first)")
    files = sorted(p for p in d.iterdir() if p.is_file() and _is_model_file(p.name))
    names = {p.name for p in files}
    if "config.json" not in names and "adapter_config.json" not in names:
        raise HubError(f"{d} has neither config.json nor adapter_config.json: not a model folder")
    if not any(n.endswith(".safetensors") for n in names):
        raise HubError(f"{d} has no *.safetensors weights (pickled weights are never uploaded)")
    return files


def _read_json(path: Path | None) -> dict[str, Any] | None:
    if path is None or not Path(path).is_file():
        return None
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise HubError(f"{path}: not valid JSON ({e})") from None


def build_hub_folder(
    recipe: Recipe,
    model_dir: str | Path,
    eval_json: str | Path | None,
    out_dir: str | Path,
    *,
    train_metrics: str | Path | Mapping[str, Any] | None = None,
    secrets: tuple[str, ...] = (),
    gguf_files: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """Assemble the folder uploaded to the Hub, replacing ``out_dir`` atomically.

    Args:
        recipe: the run's recipe (model card, ``orpo_recipe.yaml``).
        model_dir: trained model folder (``train/model``: safetensors or adapter + tokenizer).
        eval_json: the evaluation stage's ``eval.json`` (None or missing: card without metrics).
            A ``curves.png`` next to it is shipped as ``training_curves.png``.
        out_dir: the folder to write (``<run>/hub``); replaced if it exists.
        train_metrics: ``train/metrics.json`` path or dict (final losses in the card);
            default: ``model_dir/../metrics.json`` when present.
        secrets: exact strings (e.g. the token) that must not appear in any file.
        gguf_files: GGUF exports to ship (:func:`orpo_core.publish.gguf.export_gguf` results with
            ``path``, ``file``, ``quantization``, ``size``, ``sha256``): hard-linked into the folder
            and listed in the model card with usage snippets.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        HubError: missing model files or GGUF files, malformed eval.json.
    """
    from orpo_core.publish.card import build_model_card, recipe_yaml

    model_dir = Path(model_dir)
    out_dir = Path(out_dir)
    files = model_files(model_dir)
    eval_path = Path(eval_json) if eval_json else None
    eval_data = _read_json(eval_path)
    if isinstance(train_metrics, Mapping):
        tm: Mapping[str, Any] | None = train_metrics
    else:
        tm = _read_json(Path(train_metrics) if train_metrics else model_dir.parent / "metrics.json")
    curves = eval_path.parent / "curves.png" if eval_path is not None else None
    has_curves = bool(curves and curves.is_file())
    adapter_only = (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").is_file()
    ggufs = [dict(g) for g in gguf_files]
    for g in ggufs:
        if not Path(g["path"]).is_file():
            raise HubError(f"GGUF file {g['path']} does not exist (run the export stage first)")
    template_kw: dict[str, Any] = {}
    if ggufs:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir))
        template = tok.chat_template if isinstance(tok.chat_template, str) else None
        template_kw = {"chat_template": template, "bos_token": tok.bos_token, "eos_token": tok.eos_token}

    tmp = make_owned_temp_dir(out_dir)  # 0755 (not mkdtemp's 0700): readable by whoever shares the run folder
    try:
        for f in files:
            _link_or_copy(f, tmp / f.name)
        for g in ggufs:
            _link_or_copy(Path(g["path"]), tmp / Path(g["path"]).name)
        card = build_model_card(
            recipe,
            eval_data,
            repo_id=recipe.hub.repo_id,
            train_metrics=tm,
            adapter_only=adapter_only,
            has_curves=has_curves,
            secrets=secrets,
            gguf_files=[{**g, "file": Path(g["path"]).name} for g in ggufs],
            **template_kw,
        )
        (tmp / CARD_NAME).write_text(str(card), encoding="utf-8")
        (tmp / RECIPE_NAME).write_text(recipe_yaml(recipe, secrets), encoding="utf-8")
        if eval_data is not None:
            public = public_paths(eval_data, out_dir.resolve().parent)
            (tmp / EVAL_NAME).write_text(json.dumps(public, indent=2, sort_keys=True), encoding="utf-8")
        if has_curves:
            shutil.copy2(curves, tmp / CURVES_NAME)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("hub folder written to %s (%d files)", out_dir, sum(1 for _ in out_dir.iterdir()))
    return out_dir


def public_paths(obj: Any, run_root: Path) -> Any:
    """Copy of a JSON-like ``obj`` with this machine's absolute paths made shareable.

    A string that is an absolute path becomes its path relative to ``run_root`` (the run
    folder, e.g. ``/home/me/runs/x/train/model`` -> ``train/model``) when inside it, else
    ``<local>/<file name>``; Hub ids, URLs and other strings are kept. Used for the
    ``eval_results.json`` shipped to the Hub, which records the evaluated model paths.
    """
    if isinstance(obj, Mapping):
        return {k: public_paths(v, run_root) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [public_paths(v, run_root) for v in obj]
    if isinstance(obj, str) and "\n" not in obj and os.path.isabs(obj):
        path = Path(obj)
        try:
            return path.resolve().relative_to(run_root).as_posix()
        except ValueError:
            return f"<local>/{path.name}"
    return obj


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "<redacted>") if token else text


class HubPushError(RuntimeError):
    """An upload failed; ``status_code`` is the HTTP status when there was one (for retry decisions)."""

    def __init__(self, message: str, status_code: int | None = None, transient: bool = False):
        super().__init__(message)
        self.status_code = status_code
        self.transient = transient


def http_status(exc: BaseException) -> int | None:
    """HTTP status code carried by a huggingface_hub / httpx / requests error, else None."""
    for obj in (exc, getattr(exc, "__cause__", None)):
        if obj is None:
            continue
        code = getattr(obj, "status_code", None)
        if isinstance(code, int):
            return code
        resp = getattr(obj, "response", None)
        code = getattr(resp, "status_code", None)
        if isinstance(code, int):
            return code
    return None


#: HTTP statuses that a retry cannot fix: bad request, authentication, permission, not found, gone, conflict, too large
PERMANENT_STATUSES = frozenset({400, 401, 403, 404, 405, 409, 410, 413, 422})


def is_permanent_error(exc: BaseException) -> bool:
    """Whether an error can never pass by retrying: huggingface_hub's offline mode
    (``OfflineModeIsEnabled``, although it subclasses ``ConnectionError``), not-found errors
    (``RepositoryNotFoundError``, ``RevisionNotFoundError``, ``EntryNotFoundError``, gated or
    disabled repos), HTTP 400/401/403/404/405/409/410/413/422 (:data:`PERMANENT_STATUSES`),
    ``PermissionError`` and :class:`HubError`; a :class:`HubPushError` says itself."""
    from huggingface_hub import errors as hf_errors

    if isinstance(exc, HubPushError):
        return not exc.transient
    if isinstance(exc, (HubError, PermissionError)):
        return True
    permanent = tuple(
        c
        for c in (
            getattr(hf_errors, n, None)
            for n in ("OfflineModeIsEnabled", "RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError",
                      "GatedRepoError", "DisabledRepoError", "BadRequestError")
        )
        if isinstance(c, type)
    )
    if permanent and isinstance(exc, permanent):
        return True
    return http_status(exc) in PERMANENT_STATUSES


def is_transient_error(exc: BaseException) -> bool:
    """Whether an upload / download error is worth retrying: timeouts, DNS failures, connection
    errors (refused, reset), HTTP 429 and 5xx.

    Permanent (:func:`is_permanent_error`): offline mode, authentication (401/403), not found
    (404 and huggingface_hub's not-found errors), permissions, bad requests and local errors
    (:class:`HubError`, missing files).
    """
    if isinstance(exc, HubPushError):
        return exc.transient
    if is_permanent_error(exc):
        return False
    status = http_status(exc)
    if status is not None:
        return status == 429 or 500 <= status < 600
    if isinstance(exc, (TimeoutError, ConnectionError, socket.gaierror)):
        return True
    name = type(exc).__name__.lower()
    return any(s in name for s in ("timeout", "connecterror", "connectionerror", "remoteprotocolerror", "readerror"))


def refuse_offline_upload() -> None:
    """Refuse an upload in offline mode (``HF_HUB_OFFLINE=1``), before anything is built or sent.

    Raises:
        HubError: offline mode is on (permanent: a retry would fail the same way).
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise HubError("HF_HUB_OFFLINE=1: uploads are disabled in offline mode; unset HF_HUB_OFFLINE to push, or use --dry-run")


def push_folder(folder: str | Path, hub_cfg: HubConfig, token: str | None) -> str:
    """Upload ``folder`` to ``hub_cfg.repo_id`` in one commit and return the commit URL.

    Creates the repo if needed (``private=hub_cfg.private``, ``exist_ok=True``)
    and, when ``hub_cfg.revision`` is set, the branch (``exist_ok=True``) before
    ``upload_folder(revision=..., commit_message=hub_cfg.commit_message)``.

    Raises:
        HubError: invalid repo id, missing folder or model card, no token, offline mode
            (:func:`refuse_offline_upload`).
        HubPushError: the Hub call failed; the message never contains the token,
            ``transient`` tells whether a retry may help (timeouts, 429, 5xx).
    """
    repo_id = validate_repo_id(hub_cfg.repo_id)
    refuse_offline_upload()
    folder = Path(folder)
    if not (folder / CARD_NAME).is_file():
        raise HubError(f"{folder} is not a hub folder (no {CARD_NAME}); build it with build_hub_folder first")
    if not token:
        raise HubError("no Hugging Face token: set HF_TOKEN or create the Prefect Secret block (see deploy/README.md, Secrets)")
    api = HfApi()
    try:
        api.create_repo(repo_id, token=token, private=hub_cfg.private, exist_ok=True, repo_type="model")
        if hub_cfg.revision:
            api.create_branch(repo_id, branch=hub_cfg.revision, token=token, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            token=token,
            repo_type="model",
            revision=hub_cfg.revision,
            commit_message=hub_cfg.commit_message,
        )
    except Exception as e:  # noqa: BLE001 - re-raised without the token
        msg = _redact(f"upload of {folder} to {repo_id} failed: {type(e).__name__}: {e}", token)
        raise HubPushError(msg, status_code=http_status(e), transient=is_transient_error(e)) from None
    url = getattr(info, "commit_url", None) or str(info)
    logger.info("pushed %s to %s", folder, _redact(str(url), token))
    return _redact(str(url), token)


def read_published_metrics(repo_id: str, token: str | None = None, revision: str | None = None) -> dict[str, float] | None:
    """Metrics of the model-index in the Hub model card of ``repo_id`` (``{metric_name: value}``).

    Returns None when the card cannot be read (offline, no such repo, no model-index):
    the caller then relies on its local record.
    """
    from huggingface_hub import ModelCard, constants, hf_hub_download

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        path = hf_hub_download(repo_id, CARD_NAME, repo_type="model", revision=revision, token=token)
        card = ModelCard.load(path, ignore_metadata_errors=True)
    except Exception as e:  # noqa: BLE001 - offline or missing is not an error here
        logger.info("could not read the Hub model card of %s: %s", repo_id, _redact(str(e), token))
        return None
    results = getattr(card.data, "eval_results", None) or []
    out: dict[str, float] = {}
    for r in results:
        name = r.metric_name or r.metric_type
        try:
            out[name] = float(r.metric_value)
        except (TypeError, ValueError):
            continue
    return out or None

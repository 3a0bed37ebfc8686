"""Content-based cache keys for the pipeline's Prefect tasks.

A stage is cached when everything it depends on is unchanged *and* the folder
it produced is still on disk, unmodified. :class:`StageCachePolicy` (a Prefect 3
``CachePolicy``) computes:

``base key`` = sha256 of
  * the stage name,
  * the recipe fields the stage depends on (:data:`orpo_core.stages.STAGES`, e.g. train:
    model, orpo, train, peft, seed and the data lengths),
  * the content of its inputs: for ``prepare`` the source data
    (:func:`source_fingerprint`: sha256 of local files, read in 1 MiB chunks;
    a Hub dataset's ``revision``, or ``unpinned`` plus a time bucket so an
    unpinned Hub source is re-read at least once per bucket), for the other
    stages the content hash of the upstream stage's output folder
    (:func:`dir_fingerprint`), plus files the stage reads: a local model or
    tokenizer folder and a ``.jinja`` chat-template file (tokenize, train, evaluate), the training log
    ``train/log_history.json`` that evaluation plots, the eval corpus and the
    lm-eval task files,
  * the code version: ``orpo_core.__version__`` and a sha256 of the
    orpo_core files under the stage's code folders (:data:`orpo_core.stages.STAGES`),
  * the absolute output folder.

The Prefect layer turns this into a ``CachePolicy`` (``tasks.options.StageCachePolicy``);
nothing here imports Prefect.

The output folder then carries a *stamp* (``.stage.json``) written by the task
when it succeeds: the base key, the Prefect cache key it ran under, and a
manifest of the files it produced (relative path, size, mtime, sha256). The
cache key returned to Prefect is the stamp's key when the stamp matches the
base key and the manifest matches the folder; otherwise a fresh key
(base key + random nonce), which is a guaranteed cache miss. So a cached
result is never used when its folder was deleted, modified, or overwritten by
a run with another configuration (same ``run_name``, different ``orpo.beta``),
and a result from a deleted Prefect database is simply recomputed.

The manifest's per-file sha256 also spares re-hashing big files: a consumer
hashing ``train/model`` reuses the stamp's hashes when size and mtime match.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

from orpo_core.io import atomic_write_text
from orpo_core.io import file_sha256 as _sha256_of_file
from orpo_core.stages import COMMON_CODE, STAGES, recipe_fields

STAMP_NAME = ".stage.json"
INPROGRESS_NAME = ".stage-inprogress.json"
_ORPO_ROOT = Path(__file__).resolve().parent.parent

# files excluded from a stage folder's content hash (checkpoints are intermediate)
# (tracking: the experiment trackers' local stores, which the evaluation appends to)
STAGE_EXCLUDES: dict[str, tuple[str, ...]] = {"train": ("checkpoints", "tracking")}


# --------------------------------------------------------------------------- hashing
_memo: dict[tuple[str, int, int], str] = {}
_memo_lock = threading.Lock()


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file, memoised per (path, size, mtime_ns) in this process, and taken
    from a stage stamp's manifest when the stamp recorded the same size and mtime.

    Raises:
        FileNotFoundError: no such file.
    """
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    with _memo_lock:
        hit = _memo.get(key)
    if hit is not None:
        return hit
    known = _hash_from_stamps(p, st)
    if known is None:
        known = _sha256_of_file(p)
    with _memo_lock:
        _memo[key] = known
    return known


def _iter_files(root: Path, excludes: Iterable[str] = ()) -> list[Path]:
    ex = set(excludes)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if (rel_dir / d).as_posix() not in ex and not d.startswith(".tmp"))
        for name in sorted(filenames):
            rel = (rel_dir / name).as_posix()
            if name in (STAMP_NAME, INPROGRESS_NAME) or rel in ex or name.endswith(".tmp"):
                continue
            out.append(Path(dirpath) / name)
    return out


def dir_fingerprint(path: str | Path, excludes: Iterable[str] = ()) -> str:
    """Content hash of a file or folder: sha256 over sorted (relative path, file sha256).

    Stamps and temp files are ignored; ``excludes`` are relative paths (files or
    folders) left out. A missing path hashes to ``"missing:<path>"``.
    """
    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    if not p.is_dir():
        return f"missing:{p.resolve()}"
    h = hashlib.sha256()
    for f in _iter_files(p, excludes):
        h.update(f.relative_to(p).as_posix().encode())
        h.update(b"\0")
        h.update(file_sha256(f).encode())
        h.update(b"\n")
    return h.hexdigest()


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))


def hash_obj(obj: Any) -> str:
    """sha256 (hex) of the canonical JSON of ``obj``."""
    return hashlib.sha256(_canonical(obj).encode()).hexdigest()


# --------------------------------------------------------------------------- stage parts
def stage_code_files(stage: str) -> list[Path]:
    """The orpo_core files whose content is part of ``stage``'s key: every file under the stage's
    code paths and :data:`orpo_core.stages.COMMON_CODE`, less its excluded paths (no caches)."""
    st = STAGES[stage]
    files: set[Path] = set()
    for rel in (*COMMON_CODE, *st.code):
        p = _ORPO_ROOT / rel
        if p.is_file():
            files.add(p)
        elif p.is_dir():
            files.update(f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc")
    for rel in st.exclude:
        p = _ORPO_ROOT / rel
        files.difference_update([p] if p.is_file() else p.rglob("*"))
    return sorted(files)


def code_fingerprint(stage: str) -> str:
    """``orpo_core.__version__`` + sha256 over (relative path, content) of :func:`stage_code_files`,
    so moving, adding or editing a module under a stage's code paths changes its key."""
    import orpo_core

    h = hashlib.sha256(f"orpo_core=={orpo_core.__version__}".encode())
    for f in stage_code_files(stage):
        h.update(f.relative_to(_ORPO_ROOT).as_posix().encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def unpinned_bucket(now: float | None = None) -> str:
    """Time bucket for unpinned Hub sources: ``ORPO_UNPINNED_CACHE_HOURS`` (default 24) hours wide."""
    hours = float(os.environ.get("ORPO_UNPINNED_CACHE_HOURS", "24"))
    t = time.time() if now is None else now
    start = int(t // (hours * 3600) * hours * 3600)
    return datetime.fromtimestamp(start, tz=timezone.utc).strftime("%Y-%m-%dT%H:%MZ")


def source_fingerprint(source: Mapping[str, Any]) -> str:
    """Content identity of one data source (a ``data.sources`` item as a dict).

    * synthetic: its parameters (already in the recipe) -> ``"synthetic"``;
    * a local file or folder (relative to the working directory): its content hash;
      ``data_files`` inside a local folder are covered by the folder hash;
    * otherwise a Hub dataset: ``hub:<id>@<revision>``, or ``hub:<id>@unpinned:<bucket>``
      when no revision is pinned (see :func:`unpinned_bucket`).
    """
    if source.get("synthetic") is not None:
        return "synthetic"
    if source.get("onpolicy") is not None:
        return "onpolicy"  # its pairs are fingerprinted by the stage key (the run's onpolicy folder)
    path = str(source.get("path"))
    p = Path(path).expanduser()
    if p.exists():
        fp = f"local:{dir_fingerprint(p)}"
        test_split = source.get("test_split")
        if test_split and Path(str(test_split)).expanduser().exists():
            # a separate local test file (e.g. UltraFeedback's eval file) is an input too
            fp += f"+test:{dir_fingerprint(Path(str(test_split)).expanduser())}"
        return fp
    rev = source.get("revision")
    return f"hub:{path}@{rev}" if rev else f"hub:{path}@unpinned:{unpinned_bucket()}"


def _eval_inputs_fingerprint(recipe: Mapping[str, Any]) -> dict[str, str]:
    ev = recipe.get("eval") or {}
    out: dict[str, str] = {}
    if ev.get("corpus"):
        out["corpus"] = dir_fingerprint(ev["corpus"])
    if ev.get("tasks") and ev.get("tasks_dir") and Path(ev["tasks_dir"]).is_dir():
        out["tasks_dir"] = dir_fingerprint(ev["tasks_dir"])
    return out


def _local_model_fingerprint(recipe: Mapping[str, Any]) -> dict[str, str]:
    """Content hashes of ``model.name_or_path`` / ``model.tokenizer`` when they are local files or
    folders (a Hub id is covered by the recipe fields and ``model.revision``)."""
    model = recipe.get("model") or {}
    out: dict[str, str] = {}
    for field in ("name_or_path", "tokenizer"):
        value = model.get(field)
        if value and value != "tiny" and not str(value).startswith("tiny:") and Path(str(value)).expanduser().exists():
            out[field] = dir_fingerprint(Path(str(value)).expanduser())
    template = str(model.get("chat_template") or "")
    if template.lower().endswith(".jinja") and Path(template).expanduser().is_file():
        out["chat_template"] = dir_fingerprint(Path(template).expanduser())  # a template file's text, not its name
    return out


def log_history_path(model_dir: str | Path) -> Path:
    """The training log the evaluation plots: ``log_history.json`` next to the model folder."""
    return Path(model_dir).parent / "log_history.json"


def stage_base_key(stage: str, inputs: Mapping[str, Any]) -> str:
    """The content key of one stage run from the task's inputs (see module docstring).

    ``inputs`` are the task's parameters: ``recipe`` (dict), ``out_dir`` and the
    upstream folders (``data_dir``, ``tokenized_dir``, ``model_dir``).

    Raises:
        KeyError: unknown stage or missing input.
    """
    recipe = inputs["recipe"]
    parts: dict[str, Any] = {
        "stage": stage,
        "recipe": recipe_fields(recipe, STAGES[stage].fields),
        "code": code_fingerprint(stage),
        "out_dir": str(Path(inputs["out_dir"]).resolve()),
    }
    if stage == "generate":
        parts["local_model"] = _local_model_fingerprint(recipe)
        bench = [(s.get("onpolicy") or {}).get("decontaminate") for s in recipe["data"]["sources"]]
        parts["benchmark"] = [dir_fingerprint(Path(b).expanduser()) for b in bench if b and Path(b).expanduser().exists()]
    elif stage == "prepare":
        parts["sources"] = [source_fingerprint(s) for s in recipe["data"]["sources"]]
        if any(s.get("onpolicy") for s in recipe["data"]["sources"]):  # the generate stage's pairs
            parts["onpolicy"] = dir_fingerprint(Path(inputs["out_dir"]).resolve().parent / "onpolicy")
        bench = recipe["data"].get("decontaminate")
        if bench and Path(bench).expanduser().exists():
            parts["decontaminate"] = dir_fingerprint(Path(bench).expanduser())
    elif stage == "tokenize":
        parts["data"] = dir_fingerprint(inputs["data_dir"])
        parts["local_model"] = _local_model_fingerprint(recipe)
    elif stage == "train":
        parts["tokenized"] = dir_fingerprint(inputs["tokenized_dir"])
        parts["local_model"] = _local_model_fingerprint(recipe)
    elif stage == "evaluate":
        parts["model"] = dir_fingerprint(inputs["model_dir"])
        parts["tokenized"] = dir_fingerprint(inputs["tokenized_dir"])
        parts["log_history"] = dir_fingerprint(log_history_path(inputs["model_dir"]))
        parts["inputs"] = _eval_inputs_fingerprint(recipe)
        parts["local_model"] = _local_model_fingerprint(recipe)
        parts["compare_base"] = bool(inputs.get("compare_base", True))
    elif stage == "export":
        parts["model"] = dir_fingerprint(inputs["model_dir"])
        parts["quantizations"] = list(inputs["quantizations"])
        parts["local_model"] = _local_model_fingerprint(recipe)  # the base an adapter is merged into
    return hash_obj(parts)


# --------------------------------------------------------------------------- stamps
def _manifest(stage_dir: Path, excludes: Iterable[str]) -> dict[str, list]:
    out = {}
    for f in _iter_files(stage_dir, excludes):
        st = f.stat()
        out[f.relative_to(stage_dir).as_posix()] = [st.st_size, st.st_mtime_ns, file_sha256(f)]
    return out


def read_stamp(stage_dir: str | Path) -> dict[str, Any] | None:
    """The stamp of a stage folder, or None (absent or unreadable)."""
    p = Path(stage_dir) / STAMP_NAME
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def stamp_valid(stage_dir: str | Path, stamp: Mapping[str, Any]) -> bool:
    """Whether every file of the stamp's manifest is present with the same size and mtime, and no file was added."""
    d = Path(stage_dir)
    manifest = stamp.get("manifest") or {}
    excludes = stamp.get("excludes") or ()
    current = {f.relative_to(d).as_posix(): f for f in _iter_files(d, excludes)} if d.is_dir() else {}
    if set(current) != set(manifest):
        return False
    for rel, (size, mtime, _sha) in manifest.items():
        st = current[rel].stat()
        if st.st_size != size or st.st_mtime_ns != mtime:
            return False
    return True


def write_stamp(stage_dir: str | Path, stage: str, base_key: str, cache_key: str | None, result: Any = None) -> dict[str, Any]:
    """Write ``.stage.json`` for a finished stage (atomic) and return it.

    The manifest hashes every produced file once (the content hash consumers use).
    """
    d = Path(stage_dir)
    excludes = STAGE_EXCLUDES.get(stage, ())
    manifest = _manifest(d, excludes)
    content = hashlib.sha256(
        "".join(f"{rel}\0{sha}\n" for rel, (_, _, sha) in sorted(manifest.items())).encode()
    ).hexdigest()
    stamp = {
        "stage": stage,
        "base_key": base_key,
        "cache_key": cache_key,
        "content_hash": content,
        "excludes": list(excludes),
        "manifest": manifest,
        "created": datetime.now(timezone.utc).isoformat(),
        "result": result,
    }
    atomic_write_text(d / STAMP_NAME, json.dumps(stamp, indent=1, default=str))
    return stamp


def clear_stamp(stage_dir: str | Path) -> None:
    """Remove the stamp (a stage that starts running no longer vouches for its folder)."""
    (Path(stage_dir) / STAMP_NAME).unlink(missing_ok=True)


def _hash_from_stamps(p: Path, st: os.stat_result) -> str | None:
    """The sha256 of ``p`` recorded in the stamp of its folder or one of its two parents, if size and mtime match."""
    for parent in list(p.parents)[:3]:
        stamp_path = parent / STAMP_NAME
        if not stamp_path.is_file():
            continue
        stamp = read_stamp(parent)
        entry = (stamp or {}).get("manifest", {}).get(p.relative_to(parent).as_posix())
        if entry and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
            return entry[2]
    return None


# --------------------------------------------------------------------------- keys
def stage_cache_key(stage: str, inputs: Mapping[str, Any]) -> str:
    """The cache key of a stage run: the stamp's key when the output folder is intact and was
    produced under the same base key, else a fresh random key (a guaranteed miss)."""
    base = stage_base_key(stage, inputs)
    out_dir = Path(inputs["out_dir"])
    stamp = read_stamp(out_dir)
    if stamp and stamp.get("base_key") == base and stamp.get("cache_key") and stamp_valid(out_dir, stamp):
        return str(stamp["cache_key"])
    return f"{stage}-{base[:40]}-{uuid.uuid4().hex[:12]}"

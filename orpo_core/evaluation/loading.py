"""Model sources for evaluation: validate first, load later, fingerprint for the report.

A model to evaluate is one of

* a local folder with full weights (``config.json`` + ``*.safetensors``): the
  trainer's merged ``train/model/`` or the tiny base model;
* a local PEFT adapter folder (``adapter_config.json``): loaded on top of its base
  (``base_model_name_or_path``) and merged for evaluation (for QLoRA adapters the
  base is loaded unquantised in the evaluation dtype, then merged);
* a Hub id (``org/name``), which must be in the local Hugging Face cache when the
  Hub is offline (``HF_HUB_OFFLINE=1``).

:func:`validate_model_source` checks all of this without loading anything (it
reads only small JSON files), so :func:`orpo_core.evaluation.run_evaluation` can
reject bad input before spending minutes loading weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import EvalInputError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
CONFIG_FILES = ("config.json", "adapter_config.json", "generation_config.json", "tokenizer_config.json")

#: weight files larger than this in total are fingerprinted by name, size and
#: safetensors header only (hashing 16 GB of weights takes minutes).
MAX_HASH_BYTES = 4 << 30


@dataclass
class ModelSource:
    """A validated model reference.

    Attributes:
        name_or_path: the path (absolute, for local folders) or Hub id.
        kind: ``merged`` (local full weights), ``adapter`` (local PEFT adapter) or
            ``hub`` (Hub id, resolved by ``from_pretrained``).
        revision: Hub revision (branch, tag or commit) for ``hub``; None otherwise.
        base: the adapter's base model (a validated :class:`ModelSource`) for ``adapter``.
    """

    name_or_path: str
    kind: Literal["merged", "adapter", "hub"]
    revision: str | None = None
    base: "ModelSource | None" = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.base is not None:
            d["base"] = self.base.to_dict()
        return d


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in {"1", "true", "yes", "on"}


def _looks_like_path(s: str) -> bool:
    """True for strings that can only be a filesystem path (not a Hub ``org/name`` id)."""
    return (
        os.path.isabs(s)
        or s.startswith((".", "~"))
        or s.count("/") > 1
        or "\\" in s
        or s.endswith("/")
    )


def validate_model_source(
    name_or_path: str | os.PathLike,
    *,
    role: str,
    revision: str | None = None,
    must_be_local: bool = False,
) -> ModelSource:
    """Check that ``name_or_path`` names a loadable model, without loading it.

    Args:
        name_or_path: local folder or Hub id.
        role: what the model is (``"trained model"``, ``"base model"``), used in messages.
        revision: Hub revision for a Hub id.
        must_be_local: reject anything that is not an existing local folder.

    Returns:
        A :class:`ModelSource` (local paths made absolute).

    Raises:
        EvalInputError: the path does not exist, is not a folder, holds neither
            ``config.json`` nor ``adapter_config.json``, an adapter's base is itself
            invalid, or a Hub id is not cached while the Hub is offline.
    """
    s = str(name_or_path)
    p = Path(s).expanduser()
    if p.exists():
        if not p.is_dir():
            raise EvalInputError(f"{role} {s!r} is a file, not a model folder")
        p = p.resolve()
        adapter_cfg = p / "adapter_config.json"
        if adapter_cfg.is_file():
            try:
                cfg = json.loads(adapter_cfg.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise EvalInputError(f"{role} {adapter_cfg}: unreadable adapter_config.json ({e})") from None
            base_id = cfg.get("base_model_name_or_path")
            if not base_id:
                raise EvalInputError(f"{role} {adapter_cfg}: field 'base_model_name_or_path' is missing or empty")
            base = validate_model_source(
                base_id, role=f"base model of the adapter {p}", revision=cfg.get("revision")
            )
            if base.kind == "adapter":
                raise EvalInputError(f"{role} {p}: the adapter's base {base_id!r} is itself an adapter")
            return ModelSource(str(p), "adapter", base=base, extra={"peft_type": cfg.get("peft_type")})
        if (p / "config.json").is_file():
            if not any(f.suffix in WEIGHT_SUFFIXES for f in p.iterdir()):
                raise EvalInputError(f"{role} {p}: config.json found but no weight files ({', '.join(WEIGHT_SUFFIXES)})")
            return ModelSource(str(p), "merged")
        raise EvalInputError(f"{role} {p}: folder holds neither config.json nor adapter_config.json")
    if must_be_local or _looks_like_path(s):
        raise EvalInputError(f"{role} {s!r} does not exist")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(s)
    except HFValidationError:
        raise EvalInputError(f"{role} {s!r} is neither an existing folder nor a valid Hub model id") from None
    if _hub_offline():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(s, "config.json", revision=revision)
        if not isinstance(cached, str):
            raise EvalInputError(
                f"{role} {s!r} (revision {revision or 'main'}) is not in the local Hugging Face cache "
                "and the Hub is offline (HF_HUB_OFFLINE=1)"
            )
        return ModelSource(s, "hub", revision=revision, extra={"cached_snapshot": str(Path(cached).parent)})
    return ModelSource(s, "hub", revision=revision)


def model_tokenizer_source(source: ModelSource) -> ModelSource:
    """Where the model's own tokenizer lives, for an evaluation without a prepared run.

    The model folder when it holds ``tokenizer_config.json``; for an adapter without one, its
    base; a Hub id is its own source. No file is loaded.

    Raises:
        EvalInputError: a local folder (and, for an adapter, its base folder) without a tokenizer.
    """
    cand = [source] + ([source.base] if source.base is not None else [])
    for c in cand:
        if c.kind == "hub" or (Path(c.name_or_path) / "tokenizer_config.json").is_file():
            return c
    raise EvalInputError(
        f"model {source.name_or_path!r} has no tokenizer (tokenizer_config.json) and the run has no "
        "prepared tokenizer (run `orpo prep RECIPE` first)"
    )


def load_model_tokenizer(source: ModelSource, *, chat_template: str = "auto", trust_remote_code: bool = False):
    """Load the model's own tokenizer (from :func:`model_tokenizer_source`) for evaluation.

    The chat template follows ``model.chat_template`` as in tokenization
    (:func:`orpo_core.models.chat.load_tokenizer`): ``auto`` keeps the model's template and gives
    ChatML to a tokenizer without one, ``chatml`` always ChatML, ``model`` requires the model's
    own, another named template or a ``.jinja`` file is installed
    (:func:`orpo_core.models.chat_templates.apply_chat_template_setting`). The pad token defaults to
    the eos token.

    Raises:
        EvalInputError: the tokenizer cannot be loaded, or ``chat_template: model`` without one.
    """
    from transformers import AutoTokenizer

    from orpo_core.models.chat import has_chat_template, setup_chat_format

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source.revision:
        kwargs["revision"] = source.revision
    try:
        tok = AutoTokenizer.from_pretrained(source.name_or_path, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise EvalInputError(f"cannot load the tokenizer of {source.name_or_path!r}: {e}") from None
    if chat_template == "model" and not has_chat_template(tok):
        raise EvalInputError(f"tokenizer of {source.name_or_path!r} has no chat template (model.chat_template: model)")
    if chat_template == "chatml" or (chat_template == "auto" and not has_chat_template(tok)):
        setup_chat_format(tok, overwrite=True)
    elif chat_template not in ("auto", "model"):
        from orpo_core.models.chat_templates import ChatTemplateError, apply_chat_template_setting

        try:
            apply_chat_template_setting(tok, chat_template)
        except ChatTemplateError as e:
            raise EvalInputError(f"model.chat_template: {e}") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


# --------------------------------------------------------------------------- loading
def resolve_device(device: str | None = None):
    """``torch.device``: the given one, else CUDA when available, else CPU."""
    import torch

    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str, device) -> Any:
    """Evaluation dtype for ``model.dtype`` (``auto``: float32 on CPU, checkpoint dtype on GPU)."""
    import torch

    if name == "auto":
        return torch.float32 if device.type == "cpu" else "auto"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def match_vocab(model, tokenizer, seed: int = 0) -> bool:
    """Resize ``model``'s embeddings to ``len(tokenizer)`` when the tokenizer is larger.

    Needed for a base model whose tokenizer got ChatML tokens added at tokenization
    (``tokenized/stats.json`` ``tokenizer.added_tokens``). New rows use transformers'
    mean resizing (a draw from the old embeddings' mean and covariance), seeded so the
    base model's scores are reproducible. Returns True when resized.
    """
    import torch

    n = len(tokenizer)
    if n <= model.get_input_embeddings().weight.shape[0]:
        return False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.resize_token_embeddings(n, mean_resizing=True)
    return True


def _from_pretrained(source: ModelSource, dtype, trust_remote_code: bool, attn_implementation: str | None):
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if source.revision:
        kwargs["revision"] = source.revision
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(source.name_or_path, **kwargs)
    except (ValueError, ImportError) as e:
        if attn_implementation and "attn" in str(e).lower():
            kwargs.pop("attn_implementation")
            return AutoModelForCausalLM.from_pretrained(source.name_or_path, **kwargs)
        raise


def load_eval_model(
    source: ModelSource,
    tokenizer,
    *,
    dtype: str = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = "sdpa",
    seed: int = 0,
):
    """Load a validated model for evaluation: eval mode, on the device, vocab matched.

    Adapters are applied to their base (resized to the tokenizer first, so adapters
    trained with added ChatML tokens fit) and merged with ``merge_and_unload``.

    Args:
        source: from :func:`validate_model_source`.
        tokenizer: the tokenizer used for the held-out data (``tokenized/tokenizer``).
        dtype: ``model.dtype`` of the recipe (see :func:`resolve_dtype`).
        device: ``"cpu"``, ``"cuda"``, ...; None: CUDA when available.
        seed: seed for :func:`match_vocab`.

    Returns:
        A ``PreTrainedModel`` in eval mode.
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if source.kind == "adapter":
        from peft import PeftModel

        assert source.base is not None
        base = _from_pretrained(source.base, torch_dtype, trust_remote_code, attn_implementation)
        match_vocab(base, tokenizer, seed)
        model = PeftModel.from_pretrained(base, source.name_or_path).merge_and_unload()
    else:
        model = _from_pretrained(source, torch_dtype, trust_remote_code, attn_implementation)
        match_vocab(model, tokenizer, seed)
    if tokenizer.pad_token_id is not None and getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(dev)
    model.eval()
    return model


def free_memory() -> None:
    """Collect garbage and release cached CUDA memory (call after ``del model``)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- fingerprint
def _sha256_file(path: Path, h=None) -> str:
    own = h is None
    h = h or hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest() if own else ""


def _safetensors_header(path: Path) -> bytes:
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return f.read(min(n, 64 << 20))


def fingerprint_folder(path: str | Path, max_hash_bytes: int = MAX_HASH_BYTES) -> dict[str, Any]:
    """Identity of a local model folder for the report.

    Returns:
        ``config_sha256``: sha256 over the config/adapter/generation/tokenizer config
        files present (``name\0content`` in a fixed order);
        ``weight_files``: ``{name: {"bytes", "sha256"}}`` for each weight file (sha256 of
        its bytes; None when the folder's weights exceed ``max_hash_bytes`` in total,
        ``weights_hash_mode: "header"``, then the safetensors headers are hashed instead);
        ``weights_sha256``: sha256 over the ``"<name> <sha256 or header hash>\n"`` lines
        in name order; ``weights_bytes``: total size.
    """
    p = Path(path)
    cfg_hash = hashlib.sha256()
    for name in CONFIG_FILES:
        f = p / name
        if f.is_file():
            cfg_hash.update(name.encode() + b"\0")
            _sha256_file(f, cfg_hash)
    weights = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    total = sum(f.stat().st_size for f in weights)
    mode = "content" if total <= max_hash_bytes else "header"
    files: dict[str, dict[str, Any]] = {}
    combined = hashlib.sha256()
    for f in weights:
        if mode == "content":
            digest = _sha256_file(f)
            files[f.name] = {"bytes": f.stat().st_size, "sha256": digest}
        else:
            head = _safetensors_header(f) if f.suffix == ".safetensors" else b""
            digest = hashlib.sha256(str(f.stat().st_size).encode() + b"\0" + head).hexdigest()
            files[f.name] = {"bytes": f.stat().st_size, "sha256": None, "header_sha256": digest}
        combined.update(f"{f.name} {digest}\n".encode())
    return {
        "config_sha256": cfg_hash.hexdigest(),
        "weights_sha256": combined.hexdigest() if weights else None,
        "weights_hash_mode": mode,
        "weights_bytes": total,
        "weight_files": files,
    }


def describe_source(source: ModelSource, model=None) -> dict[str, Any]:
    """Report entry for a model: path/id, kind, revision, fingerprint, parameter count."""
    info: dict[str, Any] = {"name_or_path": source.name_or_path, "kind": source.kind, "revision": source.revision}
    folder = source.name_or_path if source.kind != "hub" else source.extra.get("cached_snapshot")
    if folder and Path(folder).is_dir():
        info["fingerprint"] = fingerprint_folder(folder)
        from orpo_core.models.sources import describe_origin, read_source_info

        origin = read_source_info(folder)  # a converted GGUF: where it came from
        if origin:
            info["origin"] = {k: origin.get(k) for k in ("base_model", "file", "sha256", "quantization", "dtype")}
            info["origin"]["description"] = describe_origin(origin)
    if source.kind == "hub" and source.extra.get("cached_snapshot"):
        info["commit"] = Path(source.extra["cached_snapshot"]).name
    if source.base is not None:
        info["base"] = describe_source(source.base)
    if model is not None:
        add_model_facts(info, model)
    return info


def add_model_facts(info: dict[str, Any], model) -> dict[str, Any]:
    """Add a loaded model's ``n_parameters``, ``dtype`` and Hub ``commit`` (when ``info`` has none)
    to a :func:`describe_source` entry; returns ``info``."""
    info["n_parameters"] = int(sum(p.numel() for p in model.parameters()))
    info["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    commit = getattr(model.config, "_commit_hash", None)
    if commit and "commit" not in info:
        info["commit"] = commit
    return info

"""Write a trained model folder (safetensors + tokenizer) as a GGUF file for llama.cpp.

Uses llama.cpp's own Python package ``gguf`` (``GGUFWriter``, the tensor-name map
``gguf.get_tensor_name_map``, ``gguf.SpecialVocab`` for the merges, ``gguf.quants.quantize``
for Q8_0); the layout follows what llama.cpp's ``convert_hf_to_gguf.py`` writes for the Llama
architecture (``LlamaModel``), so ``llama.cpp`` and transformers' GGUF loader read it:

* hyper-parameters ``llama.*``: context length (``max_position_embeddings``), embedding
  length, block count, feed-forward length, head counts, ``rope.dimension_count`` (head dim),
  ``rope.freq_base`` (``rope_theta``), ``attention.layer_norm_rms_epsilon``, ``vocab_size``;
  ``attention.key_length`` / ``value_length`` when ``head_dim != hidden / heads``; linear
  RoPE scaling. Other RoPE scalings (llama3, yarn, ...) are refused.
* tensors renamed by the ``gguf`` tensor-name map (``model.layers.3.self_attn.q_proj.weight`` ->
  ``blk.3.attn_q.weight``). The rows of ``q_proj`` / ``k_proj`` are permuted from Hugging
  Face's rotate-half RoPE layout to the interleaved pairs llama.cpp's ``llama`` kernels use
  (per head, ``reshape(heads, 2, head_dim / 2, ...) -> swap the two middle axes``; the
  inverse of what transformers' GGUF loader undoes). A tied lm-head is not written
  (llama.cpp and transformers then use ``token_embd`` as the output matrix).
* types: ``f32`` (everything float32), ``f16`` (2-D weights float16, norms float32, as
  llama.cpp's ``MOSTLY_F16``), ``q8_0`` (2-D weights whose rows are a multiple of 32 in
  ggml's Q8_0 blocks, 32 weights + one float16 scale; others float16; norms float32;
  llama.cpp's ``MOSTLY_Q8_0``). Deviation from ``convert_hf_to_gguf.py --outtype q8_0``: a
  *tied* token embedding, which is also the output matrix, stays float16 (as ``llama-quantize``
  keeps the output tensor at higher precision). On the main job's SmolLM2-135M (7,798 held-out
  positions) the q8_0 file's top-1 agreement with the float32 model is 99.41 % through
  transformers and 97.64 % through llama.cpp, whose CPU kernels also round activations to Q8_0
  (``benchmarks/gguf_roundtrip.py``, docs/publishing.md).
* tokenizer: byte-level BPE (``tokenizer.ggml.model = gpt2``) with the vocabulary in id order
  (ids the tokenizer does not use up to ``vocab_size`` become ``[PAD<id>]``, type UNUSED),
  token types (special added tokens CONTROL, other added tokens USER_DEFINED), the merges,
  the pre-tokenizer name llama.cpp knows for the ``tokenizer.json`` pre-tokenizer
  (:data:`PRE_TOKENIZERS`: GPT-2's regex -> ``gpt-2``, digits split one by one + GPT-2's regex
  -> ``smollm``), the bos / eos / unk / pad ids, ``add_bos_token`` (whether the tokenizer
  prepends BOS, as :func:`orpo_core.data.tokenize.bos_prefix`) and ``tokenizer.chat_template``
  (the template the model was trained with).
* provenance: ``general.name``, ``general.base_model.0.*`` (the Hub id and URL), the license,
  and ``orpo.recipe``: the recipe YAML (secrets stripped by the caller).

Only ``LlamaForCausalLM`` (``model_type: llama``, e.g. SmolLM2) is supported; anything else is
refused with :class:`GGUFExportError` naming the architecture. A LoRA / QLoRA adapter folder is
merged into its base first (:func:`export_run_model`). The file is written to a temporary
sibling and renamed, so it is complete or absent.
"""

from __future__ import annotations

from orpo_core.config import GGUF_TYPES

import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "GGUFExportError",
    "QUANTIZATIONS",
    "PRE_TOKENIZERS",
    "SUPPORTED_ARCHITECTURES",
    "export_gguf",
    "export_run_model",
    "gguf_file_name",
    "parse_quantizations",
]

QUANTIZATIONS = GGUF_TYPES
"""Accepted values of ``--gguf`` / ``hub.gguf`` (lower case, llama.cpp's names)."""

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama"}
"""Hugging Face architecture -> llama.cpp architecture written."""

PRE_TOKENIZERS: dict[str, str] = {
    "ByteLevel(regex)": "gpt-2",
    "Digits(individual)+ByteLevel(regex)": "smollm",
}
"""``tokenizer.json`` pre-tokenizer (a signature, see :func:`_pre_tokenizer_signature`) ->
llama.cpp's ``tokenizer.ggml.pre``. ``smollm``: llama.cpp splits every digit, then applies
GPT-2's regex, which is what SmolLM2's ``Sequence([Digits(individual_digits=True),
ByteLevel(use_regex=True)])`` does."""

RECIPE_KEY = "orpo.recipe"
"""Custom GGUF metadata key holding the training recipe (YAML)."""


class GGUFExportError(ValueError):
    """The model or tokenizer cannot be written as GGUF; the message names the file and what is unsupported."""


def parse_quantizations(value: str | Iterable[str] | None) -> list[str]:
    """``"f16,q8_0"`` or ``["F16", "q8_0"]`` -> ``["f16", "q8_0"]`` (deduplicated, order kept).

    Raises:
        GGUFExportError: an unknown type (the message lists :data:`QUANTIZATIONS`).
    """
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for raw in items:
        q = str(raw).strip().lower()
        if not q:
            continue
        if q not in QUANTIZATIONS:
            raise GGUFExportError(f"unknown GGUF type {raw!r}: expected one of {', '.join(QUANTIZATIONS)}")
        if q not in out:
            out.append(q)
    return out


def gguf_file_name(name: str, quantization: str) -> str:
    """The file name of an export: ``<name>.<QUANT>.gguf`` (``smollm2-instructions.Q8_0.gguf``), llama.cpp's convention."""
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-.") or "model"
    return f"{safe}.{quantization.upper()}.gguf"


# --------------------------------------------------------------------------- tokenizer
def _pre_tokenizer_signature(pre: Mapping[str, Any] | None) -> str:
    """A compact description of a ``tokenizer.json`` pre-tokenizer, e.g. ``Digits(individual)+ByteLevel(regex)``."""
    if not pre:
        return "none"
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    sig = []
    for p in parts or []:
        t = p.get("type")
        if t == "ByteLevel":
            sig.append("ByteLevel(regex)" if p.get("use_regex", True) else "ByteLevel(no-regex)")
        elif t == "Digits":
            sig.append("Digits(individual)" if p.get("individual_digits") else "Digits(grouped)")
        else:
            sig.append(str(t))
    return "+".join(sig)


def _tokenizer_json(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise GGUFExportError(f"{model_dir}: no tokenizer.json (a fast byte-level BPE tokenizer is needed for GGUF)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise GGUFExportError(f"{path}: not valid JSON ({e})") from None


def _vocab_metadata(model_dir: Path, tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """Tokens, token types, merges, pre-tokenizer, special ids and flags of a byte-level BPE tokenizer.

    Raises:
        GGUFExportError: not a BPE tokenizer, a pre-tokenizer llama.cpp has no name for, more
            tokens than ``vocab_size`` rows, or no merges.
    """
    import gguf

    from orpo_core.data.tokenize import bos_prefix

    tj = _tokenizer_json(model_dir)
    model_type = (tj.get("model") or {}).get("type")
    if model_type != "BPE":
        raise GGUFExportError(f"{model_dir / 'tokenizer.json'}: tokenizer model {model_type!r} is not supported (byte-level BPE only)")
    sig = _pre_tokenizer_signature(tj.get("pre_tokenizer"))
    pre = PRE_TOKENIZERS.get(sig)
    if pre is None:
        raise GGUFExportError(
            f"{model_dir / 'tokenizer.json'}: pre-tokenizer {sig} has no llama.cpp equivalent "
            f"(supported: {', '.join(f'{k} -> {v}' for k, v in PRE_TOKENIZERS.items())})"
        )
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise GGUFExportError(f"{model_dir}: the tokenizer has {len(vocab)} tokens but the model only {vocab_size} embedding rows")
    by_id: dict[int, str] = {i: t for t, i in vocab.items()}
    added = {int(i): t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif i in added:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.NORMAL))
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise GGUFExportError(f"{model_dir / 'tokenizer.json'}: no BPE merges found")
    # the loaded tokenizer is the truth (the recipe's chat format may have changed eos / pad)
    ids = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
    }
    special.special_token_ids = {k: int(v) for k, v in ids.items() if v is not None}
    special.add_special_token = {"bos": bool(bos_prefix(tokenizer)), "eos": False}
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = [{"name": k, "template": v} for k, v in template.items()]
    special.chat_template = template or None
    return {"tokens": tokens, "types": types, "pre": pre, "special": special}


# --------------------------------------------------------------------------- weights
def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q/k projection (``[n_head * head_dim, ...]``) from Hugging Face's rotate-half
    layout to llama.cpp's interleaved pairs: per head, rows ``(j, head_dim/2 + j)`` become
    ``(2j, 2j + 1)``. Shape and dtype unchanged."""
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _load_state_dict(model_dir: Path) -> dict[str, np.ndarray]:
    """float32 numpy arrays of every ``*.safetensors`` file of the folder (bf16/f16 upcast)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise GGUFExportError(f"{model_dir}: no *.safetensors weights")
    out: dict[str, np.ndarray] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                out[k] = sf.get_tensor(k).float().numpy()
    return out


def _rope_theta(cfg: Mapping[str, Any]) -> tuple[float, str, float | None]:
    """(theta, rope type, linear factor) from a config dict (transformers 5 ``rope_parameters`` or 4.x keys)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    factor = params.get("factor", scaling.get("factor"))
    return float(theta), str(rope_type), (float(factor) if factor is not None else None)


def _tensor_type(name: str, arr: np.ndarray, quantization: str, tied: bool = False):
    """(GGML type, data to write) of one tensor for the requested file type. With tied
    embeddings the token embedding is also the lm-head, so ``q8_0`` keeps it float16."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if quantization == "f32" or arr.ndim == 1 or name.endswith("_norm.weight"):
        return Q.F32, arr.astype(np.float32)
    if quantization == "q8_0" and arr.shape[-1] % 32 == 0 and not (tied and name == "token_embd.weight"):
        return Q.Q8_0, gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), Q.Q8_0)
    return Q.F16, arr.astype(np.float16)


def export_gguf(
    model_dir: str | Path,
    out_path: str | Path,
    quantization: str = "f16",
    *,
    name: str | None = None,
    base_model: str | None = None,
    recipe_yaml: str | None = None,
    license: str | None = None,
) -> dict[str, Any]:
    """Write the full-weight model folder ``model_dir`` as one GGUF file (see the module docstring).

    Args:
        model_dir: ``config.json`` + ``*.safetensors`` + tokenizer files (``tokenizer.json``,
            ``tokenizer_config.json``, ``chat_template.jinja``), e.g. ``<run>/train/model``.
        out_path: the ``.gguf`` file to write (replaced atomically).
        quantization: ``f32``, ``f16`` or ``q8_0`` (:data:`QUANTIZATIONS`).
        name: ``general.name`` (default: the folder name).
        base_model: Hub id of the base model (``general.base_model.0.*``).
        recipe_yaml: the training recipe (``orpo.recipe``).
        license: ``general.license``.

    Returns:
        ``{"path", "file", "quantization", "size" (bytes), "sha256", "architecture",
        "tensor_types" {GGML type: count}, "n_tensors", "chat_template" (bool), "seconds"}``.

    Raises:
        GGUFExportError: unsupported architecture, RoPE scaling, tokenizer or type; missing files.
    """
    import gguf
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    out_path = Path(out_path)
    qs = parse_quantizations(quantization)
    if len(qs) != 1:
        raise GGUFExportError(f"one GGUF type per file, got {quantization!r}")
    quant = qs[0]
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        if (model_dir / "adapter_config.json").is_file():
            raise GGUFExportError(f"{model_dir} holds a LoRA adapter: merge it first (export_run_model does)")
        raise GGUFExportError(f"{model_dir}: no config.json (not a model folder)")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    archs = cfg.get("architectures") or [cfg.get("model_type")]
    hf_arch = archs[0]
    if hf_arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFExportError(
            f"{cfg_path}: architecture {hf_arch!r} (model_type {cfg.get('model_type')!r}) cannot be exported to GGUF here; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    arch_name = SUPPORTED_ARCHITECTURES[hf_arch]
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    theta, rope_type, factor = _rope_theta(cfg)
    if rope_type not in ("default", "linear"):
        raise GGUFExportError(f"{cfg_path}: RoPE scaling {rope_type!r} is not supported (default and linear only)")

    n_layer = int(cfg["num_hidden_layers"])
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // n_head)
    vocab_size = int(cfg["vocab_size"])
    tied = bool(cfg.get("tie_word_embeddings", False))

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError) as e:
        raise GGUFExportError(f"{model_dir}: cannot load the tokenizer: {e}") from None
    vocab = _vocab_metadata(model_dir, tokenizer, vocab_size)

    state = _load_state_dict(model_dir)
    name_map = gguf.get_tensor_name_map(arch, n_layer)
    tensors: list[tuple[str, np.ndarray]] = []
    for hf_name in sorted(state):
        arr = state[hf_name]
        if hf_name == "lm_head.weight" and tied:
            continue
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        gg_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gg_name is None:
            raise GGUFExportError(f"{model_dir}: tensor {hf_name!r} has no GGUF name for {arch_name}")
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            arr = _permute_rope(arr, n_head)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            arr = _permute_rope(arr, n_kv)
        tensors.append((gg_name, arr))

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{uuid.uuid4().hex[:8]}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch_name)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or model_dir.name)
        if license:
            writer.add_license(license)
        if base_model:
            writer.add_base_model_count(1)
            writer.add_base_model_name(0, base_model.split("/")[-1])
            if "/" in base_model:
                writer.add_base_model_organization(0, base_model.split("/")[0])
            writer.add_base_model_repo_url(0, f"https://huggingface.co/{base_model}")
        if recipe_yaml:
            writer.add_string(RECIPE_KEY, recipe_yaml)
        writer.add_context_length(int(cfg.get("max_position_embeddings") or 2048))
        writer.add_embedding_length(hidden)
        writer.add_block_count(n_layer)
        writer.add_feed_forward_length(int(cfg["intermediate_size"]))
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_rope_freq_base(theta)
        writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
        writer.add_file_type(int(file_type))
        writer.add_vocab_size(vocab_size)
        writer.add_rope_dimension_count(head_dim)
        if head_dim != hidden // n_head:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        if rope_type == "linear" and factor:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(factor)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocab["pre"])
        writer.add_token_list(vocab["tokens"])
        writer.add_token_types(vocab["types"])
        vocab["special"].add_to_gguf(writer, quiet=True)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        counts: dict[str, int] = {}
        for gg_name, arr in tensors:
            qtype, data = _tensor_type(gg_name, arr, quant, tied)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
            if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                writer.add_tensor(gg_name, data)
            else:
                writer.add_tensor(gg_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    h = hashlib.sha256()
    with open(out_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    info = {
        "path": str(out_path),
        "file": out_path.name,
        "quantization": quant,
        "size": out_path.stat().st_size,
        "sha256": h.hexdigest(),
        "architecture": arch_name,
        "tensor_types": dict(sorted(counts.items())),
        "n_tensors": len(tensors),
        "chat_template": bool(vocab["special"].chat_template),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    logger.info("GGUF %s written (%s, %.1f MB, %.1f s)", out_path, quant, info["size"] / 1e6, info["seconds"])
    return info


def export_run_model(
    recipe: Any,
    model_dir: str | Path,
    out_dir: str | Path,
    quantizations: Iterable[str],
    *,
    work_dir: str | Path | None = None,
    secrets: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """Export a run's trained model folder once per type into ``out_dir``.

    A folder holding only a LoRA / QLoRA adapter (``train.save_merged: false``) is merged into
    its base first (:func:`orpo_core.models.loading._merged_from_adapter`: the base reloaded
    unquantised, the adapter applied and merged), into a temporary folder removed afterwards.
    Files are named :func:`gguf_file_name` ``(recipe.run_name, type)``; metadata names the base
    model (:func:`orpo_core.publish.card.base_model_id`) and embed the recipe as YAML without its
    ``hub`` section (publishing settings; secrets stripped by
    :func:`orpo_core.publish.card.strip_secrets`), so a changed ``hub`` setting does not change the files.

    Returns:
        one :func:`export_gguf` result per type, in the given order.

    Raises:
        GGUFExportError: see :func:`export_gguf`; no model folder.
    """
    import shutil
    import tempfile

    import yaml

    from orpo_core.publish.card import base_model_id, strip_secrets

    model_dir = Path(model_dir)
    out_dir = Path(out_dir)
    qs = parse_quantizations(quantizations)
    if not qs:
        raise GGUFExportError("no GGUF type requested (f32, f16, q8_0)")
    if not model_dir.is_dir():
        raise GGUFExportError(f"no trained model in {model_dir}: train first")
    merged_tmp: Path | None = None
    source = model_dir
    try:
        if not (model_dir / "config.json").is_file() and (model_dir / "adapter_config.json").is_file():
            from transformers import AutoTokenizer

            from orpo_core.models.loading import _merged_from_adapter

            tok = AutoTokenizer.from_pretrained(str(model_dir))
            merged = _merged_from_adapter(recipe, tok, model_dir, work_dir)
            merged_tmp = Path(tempfile.mkdtemp(prefix=".merged-", dir=out_dir.parent if out_dir.parent.exists() else None))
            merged.save_pretrained(merged_tmp)
            tok.save_pretrained(merged_tmp)
            del merged
            source = merged_tmp
            logger.info("LoRA adapter %s merged into its base for GGUF export", model_dir)
        base = base_model_id(recipe)
        trained = {k: v for k, v in recipe.to_dict().items() if k != "hub"}  # publishing settings are not the model's
        text = yaml.safe_dump(strip_secrets(trained, secrets), sort_keys=False)
        out_dir.mkdir(parents=True, exist_ok=True)
        return [
            export_gguf(
                source,
                out_dir / gguf_file_name(recipe.run_name, q),
                q,
                name=recipe.run_name,
                base_model=base,
                recipe_yaml=text,
                license=getattr(recipe.hub, "license", None),
            )
            for q in qs
        ]
    finally:
        if merged_tmp is not None:
            shutil.rmtree(merged_tmp, ignore_errors=True)

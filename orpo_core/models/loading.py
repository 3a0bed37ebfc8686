"""Loading the policy model for ORPO training (full fine-tuning, LoRA, QLoRA) and
saving the trained result.

One recipe drives all three modes (``peft.method``):

* ``none``  full fine-tuning of every parameter;
* ``lora``  low-rank adapters (peft ``LoraConfig``: ``r``, ``lora_alpha``,
  ``lora_dropout``, ``target_modules``) on a frozen base in the recipe's dtype;
* ``qlora`` the same adapters on a base quantised to 4-bit NF4 by bitsandbytes
  (``BitsAndBytesConfig``: quant type, double quantisation, compute dtype; Dettmers
  et al. 2023, arXiv 2305.14314), prepared with peft's
  ``prepare_model_for_kbit_training`` (norms and lm-head in float32). On CPU the
  compute dtype is always float32 (bitsandbytes' CPU kernels).

When tokenization added ChatML tokens (``tokenized/stats.json`` ``tokenizer.added_tokens``)
the embeddings are resized to ``len(tokenizer)`` (seeded mean resizing) and, under
LoRA/QLoRA, the input and output embedding modules are trained and saved in full
(``modules_to_save``), since the new rows have never been trained.

Saving (:func:`save_trained_model`): full fine-tuning writes safetensors weights;
LoRA/QLoRA write the adapter and, when ``train.save_merged``, merged full weights
obtained by reloading the base **unquantised** (float32 on CPU, the recipe dtype or
bfloat16 on CUDA), applying the saved adapter and ``merge_and_unload``. For QLoRA this
merges into the full-precision base rather than the 4-bit weights the adapter was
trained against (the usual practice: 4-bit weights cannot hold the merged update);
the merged model therefore differs from the trained one by the NF4 quantisation error.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from orpo_core.config import Recipe
from orpo_core.models.sources import ModelSourceError, resolve_model_source

logger = logging.getLogger(__name__)

__all__ = [
    "ModelLoadError",
    "resolve_torch_dtype",
    "load_model",
    "disable_dropout_in_model",
    "embedding_module_names",
    "is_peft_model",
    "save_trained_model",
]

ADAPTER_SUBDIR = "adapter"


class ModelLoadError(ValueError):
    """The model id/path cannot be loaded (missing folder, unknown or uncached Hub id,
    bad quantisation setup); the message names the id and revision."""


# --------------------------------------------------------------------------- helpers
def _cuda() -> bool:
    return torch.cuda.is_available()


def resolve_torch_dtype(name: str, device_type: str | None = None) -> torch.dtype:
    """``model.dtype`` -> torch dtype. ``auto``: bfloat16 on CUDA with bf16 support, else
    float16 on older CUDA GPUs, float32 on CPU."""
    device_type = device_type or ("cuda" if _cuda() else "cpu")
    if name == "auto":
        if device_type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _looks_like_path(s: str) -> bool:
    return os.path.isabs(s) or s.startswith((".", "~")) or s.count("/") > 1 or "\\" in s or s.endswith("/")


def _resolve_source(recipe: Recipe, work_dir: str | Path | None = None) -> str:
    """Local folder (absolute) or Hub id of the base model (GGUF sources converted to their
    cached folder by :mod:`orpo_core.models.sources`); raises ModelLoadError for a local path
    that does not exist or a GGUF source that cannot be resolved."""
    mcfg = recipe.require_model()
    try:
        src = resolve_model_source(mcfg, work_dir if work_dir is not None else recipe.out_dir, seed=recipe.seed).path
    except ModelSourceError as e:
        raise ModelLoadError(str(e)) from None
    p = Path(src).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"model.name_or_path {src!r} is a file, not a model folder")
        return str(p.resolve())
    if _looks_like_path(src):
        raise ModelLoadError(f"model.name_or_path {src!r}: local folder does not exist")
    return src


def disable_dropout_in_model(model: torch.nn.Module) -> int:
    """Set every dropout probability in ``model`` to 0 (TRL ``disable_dropout_in_model``
    plus functional attention dropout read from module attributes such as
    ``attention_dropout``). Returns the number of modules changed."""
    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
            n += 1
        for attr in ("attention_dropout", "dropout_rate"):
            v = getattr(module, attr, None)
            if isinstance(v, float) and not isinstance(v, bool) and v != 0.0:
                setattr(module, attr, 0.0)
                n += 1
    cfg = getattr(model, "config", None)
    if cfg is not None:
        for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
            v = getattr(cfg, key, None)
            if isinstance(v, float) and v != 0.0:
                setattr(cfg, key, 0.0)
    return n


def embedding_module_names(model: torch.nn.Module) -> list[str]:
    """Leaf names (e.g. ``["embed_tokens", "lm_head"]``) of the input and output
    embedding modules, for peft's ``modules_to_save``."""
    names = []
    targets = [model.get_input_embeddings(), model.get_output_embeddings()]
    for target in targets:
        if target is None:
            continue
        for name, module in model.named_modules():
            if module is target:
                leaf = name.rsplit(".", 1)[-1]
                if leaf not in names:
                    names.append(leaf)
                break
    return names


def is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def _quantization_config(recipe: Recipe, device_type: str):
    from transformers import BitsAndBytesConfig

    p = recipe.peft
    compute = torch.float32 if device_type == "cpu" else resolve_torch_dtype(p.bnb_4bit_compute_dtype, device_type)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=p.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=p.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=torch.uint8,
    )


def _from_pretrained(source: str, recipe: Recipe, dtype: torch.dtype, quantization_config=None, device_map=None):
    from transformers import AutoModelForCausalLM

    mcfg = recipe.require_model()
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": bool(mcfg.trust_remote_code),
        "use_safetensors": True,
    }
    if mcfg.revision and source == mcfg.name_or_path:  # a Hub id; local and converted folders have none
        kwargs["revision"] = mcfg.revision
    if mcfg.attn_implementation:
        kwargs["attn_implementation"] = mcfg.attn_implementation
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device_map is not None:
        kwargs["device_map"] = device_map
    rev = f" (revision {kwargs['revision']})" if "revision" in kwargs else ""
    try:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}
        hint = " The Hub is offline (HF_HUB_OFFLINE=1) and it is not in the local cache." if offline else ""
        raise ModelLoadError(
            f"cannot load model {source!r}{rev}: not a local model folder with safetensors weights and not "
            f"resolvable as a Hub model id.{hint} ({type(e).__name__}: {e})"
        ) from None


def _disable_bnb_cpu_repacking(model) -> int:
    """Keep bitsandbytes' CPU 4-bit layers on one numeric path.

    On CPUs with AVX512-BF16, ``Linear4bit.forward`` in eval mode without grad repacks the
    weight in place into a CPU layout whose absmax scales are rounded to bfloat16 (and
    stays so for training and saving afterwards). An evaluation during training would
    then silently change the frozen base, and a reloaded adapter would not reproduce the
    trained model's logits. Turning the flag off keeps the plain dequantisation path
    everywhere (slower CPU inference; GPUs are unaffected). Returns the layers changed.
    """
    n = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def _resize_embeddings(model, tokenizer, seed: int) -> bool:
    """Grow the embeddings to ``len(tokenizer)`` (seeded mean resizing); never shrinks."""
    n = len(tokenizer)
    current = model.get_input_embeddings().weight.shape[0]
    if n <= current:
        return False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.resize_token_embeddings(n, mean_resizing=True)
    return True


def _sync_special_tokens(model, tokenizer) -> None:
    """Copy the tokenizer's bos/eos/pad ids into the model and generation configs (TRL ``setup_chat_format``)."""
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(tokenizer, key, None)
        if v is None:
            continue
        setattr(model.config, key, v)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            setattr(gen, key, v)


# --------------------------------------------------------------------------- loading
def load_model(recipe: Recipe, tokenizer, added_tokens: bool, for_training: bool = True, work_dir: str | Path | None = None):
    """Load the policy model described by ``recipe`` for ORPO training.

    Args:
        recipe: ``model`` (id/path, revision, dtype, trust_remote_code, attention),
            ``peft`` (method and LoRA/QLoRA settings), ``train`` (gradient
            checkpointing, dropout) and ``seed``.
        tokenizer: the tokenizer the data was tokenized with (``tokenized/tokenizer``).
        added_tokens: whether tokenization added ChatML tokens (the embeddings are
            resized to ``len(tokenizer)`` and, under LoRA, trained in full).
        for_training: True: wrap LoRA/QLoRA adapters, enable gradient checkpointing
            (``use_reentrant=False``), disable dropout (``train.disable_dropout``) and
            put the model in train mode. False: plain base model (no adapters) in
            eval mode.
        work_dir: where a ``tiny`` model is built (default ``recipe.out_dir``).

    Returns:
        A ``PreTrainedModel`` (full) or ``peft.PeftModel`` (LoRA/QLoRA), on CUDA when
        available (QLoRA is placed by ``device_map``), in the dtype from
        :func:`resolve_torch_dtype`.

    Raises:
        ModelLoadError: unknown local path or Hub id (also when the Hub is offline and
            the id is not cached), or QLoRA without a working bitsandbytes.
        RecipeError: the recipe has no ``model`` section.
    """
    mcfg = recipe.require_model()
    device_type = "cuda" if _cuda() else "cpu"
    dtype = resolve_torch_dtype(mcfg.dtype, device_type)
    source = _resolve_source(recipe, work_dir)
    method = recipe.peft.method
    quant = None
    device_map = None
    if method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:  # pragma: no cover - dependency of the project
            raise ModelLoadError(f"peft.method qlora needs bitsandbytes ({e})") from None
        quant = _quantization_config(recipe, device_type)
        if device_type == "cpu":
            dtype = torch.float32
            device_map = "cpu"
        else:
            device_map = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    logger.info("loading model %s (dtype %s, peft %s)", source, dtype, method)
    model = _from_pretrained(source, recipe, dtype, quantization_config=quant, device_map=device_map)
    if quant is not None and device_type == "cpu":
        _disable_bnb_cpu_repacking(model)

    resized = _resize_embeddings(model, tokenizer, recipe.seed)
    if resized:
        logger.info("resized token embeddings to %d for the added chat tokens", len(tokenizer))
    _sync_special_tokens(model, tokenizer)

    if not for_training:
        model.eval()
        return model

    gc = recipe.train.gradient_checkpointing
    gc_kwargs = {"use_reentrant": False}
    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs=gc_kwargs
        )
    elif gc:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs)
        else:  # pragma: no cover - older transformers
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    if gc:
        model.config.use_cache = False

    if method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        p = recipe.peft
        modules_to_save = list(p.modules_to_save) if p.modules_to_save else []
        if added_tokens:
            for name in embedding_module_names(model):
                if name not in modules_to_save:
                    modules_to_save.append(name)
        tied = bool(getattr(model.config, "tie_word_embeddings", False)) or (
            model.get_output_embeddings() is not None
            and model.get_output_embeddings().weight is model.get_input_embeddings().weight
        )
        lcfg = LoraConfig(
            r=p.r,
            lora_alpha=p.lora_alpha,
            lora_dropout=p.lora_dropout,
            target_modules=p.target_modules,
            modules_to_save=modules_to_save or None,
            ensure_weight_tying=bool(tied and modules_to_save),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lcfg)

    if recipe.train.disable_dropout:
        disable_dropout_in_model(model)
    if device_map is None and device_type == "cuda":
        model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    model.train()
    return model


# --------------------------------------------------------------------------- saving
def _atomic_dir(final: Path) -> Path:
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(f".{final.name}.old{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _save_tokenizer(tokenizer, folder: Path) -> None:
    tokenizer.save_pretrained(folder)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and not (folder / "chat_template.jinja").exists():
        (folder / "chat_template.jinja").write_text(template, encoding="utf-8")


def _merged_from_adapter(recipe: Recipe, tokenizer, adapter_dir: Path, work_dir: str | Path | None):
    """Reload the base unquantised, apply the saved adapter and merge (see module docstring)."""
    from peft import PeftModel

    mcfg = recipe.require_model()
    device_type = "cuda" if _cuda() else "cpu"
    dtype = resolve_torch_dtype(mcfg.dtype, device_type)
    if recipe.peft.method == "qlora" and device_type == "cuda" and mcfg.dtype == "auto":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    base = _from_pretrained(_resolve_source(recipe, work_dir), recipe, dtype)
    _resize_embeddings(base, tokenizer, recipe.seed)
    _sync_special_tokens(base, tokenizer)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged


def save_trained_model(
    model,
    tokenizer,
    recipe: Recipe,
    out_dir: str | Path,
    work_dir: str | Path | None = None,
    state_dict: dict | None = None,
) -> dict[str, str]:
    """Write the trained model to ``out_dir/model`` (and ``out_dir/adapter`` for LoRA
    with ``train.save_merged``), each with the tokenizer and its chat template.

    ``state_dict``: the full weights gathered from sharded training (FSDP, DeepSpeed ZeRO-3,
    ``accelerator.get_state_dict``), used instead of ``model``'s own (possibly sharded) tensors.

    Layout:
        * full fine-tuning: ``model/`` = safetensors weights + config + tokenizer;
        * LoRA/QLoRA, ``save_merged`` true: ``adapter/`` = PEFT adapter
          (``adapter_model.safetensors``, ``adapter_config.json`` whose
          ``base_model_name_or_path`` is the absolute base path or Hub id) + tokenizer;
          ``model/`` = merged full weights (see module docstring for QLoRA);
        * LoRA/QLoRA, ``save_merged`` false: ``model/`` = the adapter + tokenizer.

    Each folder is written to a temporary sibling and renamed, so it is complete or absent.

    Returns:
        ``{"model": path, "kind": "full"|"merged"|"adapter", "adapter": path (LoRA only)}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info: dict[str, str] = {}
    model_dir = out / "model"
    if is_peft_model(model):
        adapter_final = out / ADAPTER_SUBDIR if recipe.train.save_merged else model_dir
        tmp = _atomic_dir(adapter_final)
        model.save_pretrained(tmp, state_dict=state_dict)
        _save_tokenizer(tokenizer, tmp)
        _publish(tmp, adapter_final)
        info["adapter"] = str(adapter_final)
        if recipe.train.save_merged:
            merged = _merged_from_adapter(recipe, tokenizer, adapter_final, work_dir)
            tmp = _atomic_dir(model_dir)
            merged.save_pretrained(tmp)
            _save_tokenizer(tokenizer, tmp)
            _publish(tmp, model_dir)
            info["kind"] = "merged"
            del merged
        else:
            info["kind"] = "adapter"
    else:
        tmp = _atomic_dir(model_dir)
        model.save_pretrained(tmp, state_dict=state_dict)
        _save_tokenizer(tokenizer, tmp)
        _publish(tmp, model_dir)
        info["kind"] = "full"
    info["model"] = str(model_dir)
    return info

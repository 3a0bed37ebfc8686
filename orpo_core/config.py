"""Recipe (run configuration) schema.

A recipe is one YAML file with the sections below. It is validated into typed
pydantic objects: unknown keys and bad values raise :class:`RecipeError` with
the offending path (``orpo.beta``), so a typo never silently falls back to a
default. ``--set section.key=value`` overrides are applied before validation by
:func:`load_recipe`.

Sections
--------
``model``  base model and tokenizer (Hub id, local path or ``tiny:<name>``).
``data``   preference sources, cleaning, split and tokenization lengths.
``orpo``   the objective: ``alpha`` (NLL weight) and ``beta`` (TRL's name for
           the paper's lambda, weight of the odds-ratio term).
``train``  optimisation and Trainer settings.
``peft``   full fine-tuning, LoRA or QLoRA.
``eval``   held-out preference metrics, perplexity, lm-eval tasks.
``hub``    publishing to the Hugging Face Hub.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class RecipeError(ValueError):
    """A recipe file or override is malformed (message names file and key)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# --------------------------------------------------------------------------- model
class TinyModelConfig(_Strict):
    """Shape of a randomly initialised SmolLM3-style model built locally (``model.name_or_path: tiny``)."""

    hidden_size: int = Field(64, gt=0)
    intermediate_size: int = Field(192, gt=0)
    num_hidden_layers: int = Field(2, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int = Field(2, gt=0)
    max_position_embeddings: int = Field(1024, gt=0)
    vocab_size: int | None = Field(None, gt=0, description="None: the size of the locally built tokenizer")
    tokenizer: Literal["char", "gpt2"] = "char"

    @model_validator(mode="after")
    def _heads(self) -> "TinyModelConfig":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be divisible by num_key_value_heads")
        return self


class ModelConfig(_Strict):
    name_or_path: str = Field(..., description="Hub id, local folder, or 'tiny' for a locally built random model")
    revision: str | None = None
    tokenizer: str | None = Field(None, description="tokenizer id/path when different from the model")
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str | None = "sdpa"
    chat_template: Literal["auto", "chatml", "model"] = Field(
        "auto", description="auto: the tokenizer's template, or ChatML when it has none; chatml: always ChatML"
    )
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)

    @property
    def is_tiny(self) -> bool:
        return self.name_or_path == "tiny" or self.name_or_path.startswith("tiny:")


# --------------------------------------------------------------------------- data
ColumnMap = dict[str, str]


class BinarizeConfig(_Strict):
    """How rows with several rated completions become (chosen, rejected) pairs."""

    strategy: Literal["best_vs_worst", "best_vs_random", "all_pairs"] = "best_vs_worst"
    score: str = Field("overall_score", description="UltraFeedback: overall_score or a fine-grained aspect mean 'annotations'")
    margin: float = Field(0.0, ge=0, description="all_pairs: minimum score difference")
    seed: int | None = Field(None, description="None: the recipe seed")


class SyntheticConfig(_Strict):
    """The project's own seeded, learnable preference set (offline default)."""

    task: Literal["arithmetic"] = "arithmetic"
    n_rows: int = Field(2000, gt=1)
    seed: int | None = None


class SourceConfig(_Strict):
    """One preference source. ``path`` is a Hub dataset id, a local file or a folder;
    ``synthetic`` uses the generator instead of a path."""

    path: str | None = None
    synthetic: SyntheticConfig | None = None
    name: str | None = Field(None, description="Hub dataset config name")
    split: str = "train"
    test_split: str | None = Field(None, description="use this split of the source as test data instead of a random split")
    revision: str | None = None
    data_files: str | list[str] | None = None
    format: Literal["auto", "standard", "conversational", "hh", "sharegpt", "ratings"] = "auto"
    columns: ColumnMap = Field(default_factory=dict, description="canonical name -> column name in the source")
    weight: float | None = Field(None, gt=0, description="relative share of the mix (sampling, seeded)")
    max_rows: int | None = Field(None, gt=0, description="row cap for this source")
    binarize: BinarizeConfig = Field(default_factory=BinarizeConfig)
    label: str | None = Field(None, description="value of the 'source' column; default derived from path")

    @model_validator(mode="after")
    def _one_origin(self) -> "SourceConfig":
        if (self.path is None) == (self.synthetic is None):
            raise ValueError("a source needs exactly one of 'path' or 'synthetic'")
        return self

    @property
    def display_name(self) -> str:
        if self.label:
            return self.label
        if self.synthetic is not None:
            return f"synthetic:{self.synthetic.task}"
        return str(self.path)


class DataConfig(_Strict):
    sources: list[SourceConfig] = Field(..., min_length=1)
    test_size: float = Field(0.1, ge=0, lt=1, description="fraction held out when a source has no test_split")
    min_score_margin: float | None = Field(None, ge=0, description="drop pairs whose score gap is smaller")
    dedup: bool = True
    on_error: Literal["raise", "skip"] = "raise"
    max_length: int = Field(1024, gt=1, description="prompt + completion tokens")
    max_prompt_length: int = Field(512, gt=0)
    num_proc: int = Field(
        1, ge=1, description="processes for tokenization (datasets.map, >= 1000 rows each); preparation uses one"
    )
    cache_dir: str | None = None

    @model_validator(mode="after")
    def _lengths(self) -> "DataConfig":
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be < max_length ({self.max_length})"
            )
        return self


# --------------------------------------------------------------------------- orpo
class ScheduleConfig(_Strict):
    """A coefficient schedule over optimizer steps: constant, or a linear ramp from
    ``start`` to the section's value over ``warmup_steps`` steps."""

    type: Literal["constant", "linear"] = "constant"
    start: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)


class ORPOConfig(_Strict):
    """ORPO objective (Hong et al. 2024, eq. 6): L = alpha * L_SFT + beta * L_OR."""

    beta: float = Field(0.1, ge=0, description="weight of the odds-ratio term (paper's lambda, TRL's beta)")
    alpha: float = Field(1.0, ge=0, description="weight of the NLL (SFT) term; 0 = pure odds-ratio")
    nll_on_prompt: bool = Field(True, description="NLL over prompt tokens too (paper's code and TRL)")
    beta_schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    alpha_schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    fused_loss: bool = Field(True, description="chunked lm-head + loss: never materialise [2B, T, V] logits")
    chunk_size: int = Field(
        1024, gt=0,
        description="target tokens per chunk of the fused loss (peak O(chunk_size * V)); the faster one-pass "
        "gradient needs each pair's target tokens (chosen row + rejected completion) to fit in one chunk",
    )
    prompt_sharing: bool | Literal["auto"] = Field(
        "auto",
        description="compute each pair's prompt once ([prompt | chosen | rejected] row, orpo_core/sharing.py); "
        "auto: per batch when the model supports it and the estimated cost is lower by a margin (sharing_pays)",
    )
    padding_free: bool | Literal["auto"] = Field(
        "auto",
        description="pack each batch into one row without padding (orpo_core/packing.py); auto: on for "
        "supported decoders with sdpa or flash attention, off otherwise (eager would need a dense mask)",
    )
    router_aux_loss_coef: float | None = Field(None, ge=0, description="MoE aux loss weight (None: model config)")
    on_nonfinite: Literal["raise", "skip"] = "raise"

    @model_validator(mode="after")
    def _not_both_zero(self) -> "ORPOConfig":
        if self.alpha == 0 and self.beta == 0:
            raise ValueError("alpha and beta cannot both be 0 (nothing to train)")
        return self


# --------------------------------------------------------------------------- train
class TrainConfig(_Strict):
    learning_rate: float = Field(8e-6, gt=0)
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    optim: str = "adamw_torch"
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1)
    per_device_train_batch_size: int = Field(2, gt=0)
    per_device_eval_batch_size: int = Field(4, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    gradient_checkpointing: bool = False
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 on CUDA if supported, fp32 on CPU")
    logging_steps: int = Field(10, gt=0)
    eval_steps: int | None = Field(None, gt=0, description="None: evaluate at the end only")
    save_steps: int | None = Field(None, gt=0, description="checkpoint every N steps")
    save_total_limit: int | None = Field(2, gt=0)
    disable_dropout: bool = True
    group_by_length: bool = True
    pad_to_multiple_of: int | None = Field(None, gt=0, description="None: 8 on CUDA, none on CPU")
    dataloader_num_workers: int = Field(0, ge=0)
    save_merged: bool = Field(True, description="LoRA: save merged full weights (False: adapter only)")
    report_to: list[str] = Field(default_factory=list)
    seed: int | None = Field(None, description="None: the recipe seed")


class PeftConfig(_Strict):
    method: Literal["none", "lora", "qlora"] = "none"
    r: int = Field(16, gt=0)
    lora_alpha: int = Field(32, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] | None = None
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    bnb_4bit_use_double_quant: bool = True


# --------------------------------------------------------------------------- eval
class EvalConfig(_Strict):
    preference: bool = True
    bootstrap_samples: int = Field(1000, ge=0)
    perplexity: bool = True
    corpus: str | None = Field(None, description="raw text file for corpus perplexity (e.g. WikiText-2 test)")
    corpus_max_tokens: int | None = Field(20000, gt=0)
    stride: int = Field(512, gt=0)
    window: int | None = Field(None, gt=0, description="None: model's max_length from data")
    tasks: list[str] = Field(default_factory=list, description="lm-eval task names")
    tasks_dir: str = Field("../shared/data/eval", description="folder with the offline task files")
    limit: int | None = Field(None, gt=0, description="lm-eval rows per task")
    batch_size: int = Field(8, gt=0)
    compare_base: bool = True
    max_new_tokens: int = Field(64, gt=0)
    prompts: list[str] = Field(default_factory=list, description="fixed prompts answered by base and trained model")
    n_prompts: int = Field(3, ge=0, description="held-out prompts answered side by side when 'prompts' is empty")
    max_pairs: int | None = Field(None, gt=0, description="cap on held-out pairs evaluated")
    gate_metric: str = Field("preference/accuracy", description="retrain publishes only if this improves")
    gate_mode: Literal["max", "min"] = "max"


# --------------------------------------------------------------------------- hub
class HubConfig(_Strict):
    repo_id: str | None = None
    private: bool = True
    revision: str | None = None
    commit_message: str = "Upload ORPO model"
    push: bool = Field(False, description="False: dry run, write the folder that would be uploaded")
    license: str = "apache-2.0"
    tags: list[str] = Field(default_factory=lambda: ["orpo", "trl-compatible", "alignment"])

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(v)
        except HFValidationError as e:  # pragma: no cover - message passthrough
            raise ValueError(str(e)) from None
        if "/" not in v:
            raise ValueError(f"repo_id {v!r} must be 'namespace/name'")
        return v


# --------------------------------------------------------------------------- recipe
class Recipe(_Strict):
    run_name: str = "orpo-run"
    output_dir: str = Field("runs/${run_name}", description="all stage outputs go under this folder")
    seed: int = 42
    model: ModelConfig | None = Field(None, description="None: a data-only recipe (prep without tokenization)")
    data: DataConfig
    orpo: ORPOConfig = Field(default_factory=ORPOConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    peft: PeftConfig = Field(default_factory=PeftConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    hub: HubConfig = Field(default_factory=HubConfig)

    # file the recipe came from (not part of the schema); relative paths resolve against its folder's parent
    _source_file: Path | None = None

    @property
    def out_dir(self) -> Path:
        return Path(self.output_dir.replace("${run_name}", self.run_name))

    def require_model(self) -> ModelConfig:
        """Return ``model`` or raise :class:`RecipeError` for a data-only recipe."""
        if self.model is None:
            raise RecipeError("this command needs a 'model' section in the recipe")
        return self.model

    def section_hash(self, *sections: str) -> str:
        """sha256 (hex, 16 chars) of the named sections' canonical JSON, for cache keys."""
        payload = {s: self._dump_section(s) for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _dump_section(self, name: str) -> Any:
        value = getattr(self, name)
        return value.model_dump(mode="json") if isinstance(value, BaseModel) else value

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- loading
def _parse_value(raw: str) -> Any:
    """Parse an override value as YAML (numbers, bools, lists, null), falling back to the string."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw recipe dict (returns a copy).

    List items are addressed by index (``data.sources.0.max_rows=100``).

    Raises:
        RecipeError: an override without ``=``.
    """
    out = copy.deepcopy(data)
    if not overrides:
        return out
    items = overrides.items() if isinstance(overrides, dict) else []
    if isinstance(overrides, list):
        parsed = []
        for ov in overrides:
            if "=" not in ov:
                raise RecipeError(f"override {ov!r} must look like section.key=value")
            k, v = ov.split("=", 1)
            parsed.append((k.strip(), _parse_value(v)))
        items = parsed
    for key, value in items:
        parts = key.split(".")
        node: Any = out
        for i, p in enumerate(parts[:-1]):
            if isinstance(node, list):
                try:
                    node = node[int(p)]
                except (ValueError, IndexError):
                    raise RecipeError(f"override {key!r}: {'.'.join(parts[: i + 1])} is not a valid list index") from None
                continue
            if p not in node or node[p] is None:
                node[p] = {}
            node = node[p]
        last = parts[-1]
        if isinstance(node, list):
            try:
                node[int(last)] = value
            except (ValueError, IndexError):
                raise RecipeError(f"override {key!r}: {last} is not a valid list index") from None
        else:
            node[last] = value
    return out


def _format_errors(err: ValidationError, where: str) -> str:
    lines = [f"invalid recipe {where}:"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def recipe_from_dict(data: dict[str, Any], where: str = "<dict>", base_dir: Path | None = None) -> Recipe:
    """Validate a raw dict into a :class:`Recipe`.

    Raises:
        RecipeError: unknown keys or bad values, each with its dotted path.
    """
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_errors(e, where)) from None
    recipe._source_file = Path(where) if where and not where.startswith("<") else None
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> Recipe:
    """Read a YAML recipe, apply overrides and validate.

    Relative paths inside the recipe (local data files, ``eval.tasks_dir``) are
    interpreted relative to the current working directory, which for the CLI is
    the project root.

    Raises:
        RecipeError: missing file, YAML syntax error, unknown key or bad value.
    """
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(f"{p}: YAML syntax error: {e}") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{p}: not UTF-8 ({e})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{p}: a recipe must be a mapping of sections")
    raw = apply_overrides(raw, overrides)
    return recipe_from_dict(raw, where=str(p))

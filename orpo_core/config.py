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
``train``  optimisation and Trainer settings; ``train.distributed`` several processes /
           machines with DDP, FSDP or DeepSpeed ZeRO (:mod:`orpo_core.training.launch`).
``peft``   full fine-tuning, LoRA or QLoRA.
``eval``   held-out preference metrics, perplexity, lm-eval tasks.
``hub``    publishing to the Hugging Face Hub.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


#: the project's shared data folder (``../shared`` beside the checkout; ``$ORPO_SHARED_DIR`` overrides)
SHARED_DIR = Path(os.environ.get("ORPO_SHARED_DIR", Path(__file__).resolve().parent.parent.parent / "shared"))


#: names of ``model.chat_template`` (their templates: :mod:`orpo_core.models.chat_templates`)
CHAT_TEMPLATE_NAMES = ("chatml", "llama3", "zephyr", "mistral", "gemma")
#: GGUF types of ``hub.gguf`` / ``orpo export --gguf`` (lower case, llama.cpp's names; :mod:`orpo_core.publish.gguf`)
GGUF_TYPES = ("f32", "f16", "q8_0")


class RecipeError(ValueError):
    """A recipe file or override is malformed (message names file and key)."""


#: what ``run_name`` may look like (one folder name; ``..`` is rejected separately)
RUN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
#: a Hugging Face access token (``hf_`` + 30 or more letters/digits): never accepted in a recipe or override
HF_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{30,}")
#: override keys that name a secret
_SECRET_KEY_RE = re.compile(r"(^|\.)(hf_|hub_|access_|auth_)?(token|secret|password|api_key)$", re.IGNORECASE)
TOKEN_HINT = (
    "tokens never go into a recipe or a --set override (they would be stored in clear in Prefect's flow-run "
    "parameters): set the environment variable HF_TOKEN or run `hf auth login` on the machine that pushes"
)


def check_no_secrets(overrides: list[str] | dict[str, Any] | None) -> None:
    """Refuse overrides that carry a secret: a key such as ``hub.token`` or any value that looks like
    a Hugging Face token (:data:`HF_TOKEN_RE`).

    Raises:
        RecipeError: naming the key (never the value) and where tokens go (:data:`TOKEN_HINT`).
    """
    if not overrides:
        return
    items = overrides.items() if isinstance(overrides, dict) else (
        (ov.split("=", 1)[0], ov.split("=", 1)[1] if "=" in ov else "") for ov in overrides
    )
    for key, value in items:
        key = str(key).strip()
        if _SECRET_KEY_RE.search(key):
            raise RecipeError(f"override {key!r} names a secret; {TOKEN_HINT}")
        if HF_TOKEN_RE.search(str(value)):
            raise RecipeError(f"override {key!r} has a value that looks like a Hugging Face token; {TOKEN_HINT}")


class _Strict(BaseModel):
    """Base of every recipe section: unknown keys rejected, assignments validated, and no
    non-finite float anywhere (``allow_inf_nan=False``: ``.inf`` / ``.nan`` fail validation)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)


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
    name_or_path: str = Field(
        ...,
        description="Hub id, local folder, a .gguf file, a packaged model's short name "
        "(smollm2-135m-instruct; orpo_core.models.sources), or 'tiny' for a locally built random model",
    )
    revision: str | None = None
    gguf_file: str | None = Field(
        None, description="GGUF file inside the name_or_path folder (or Hub repo); converted once to a cached safetensors folder"
    )
    tokenizer: str | None = Field(None, description="tokenizer id/path when different from the model")
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str | None = "sdpa"
    chat_template: str = Field(
        "auto",
        description="auto: the tokenizer's template, or ChatML when it has none; model: the tokenizer's own (required); "
        "a named template (chatml, llama3, zephyr, mistral, gemma; orpo_core.models.chat_templates) or a path to a .jinja file",
    )
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, v: str) -> str:
        if v in ("auto", "model") or v in CHAT_TEMPLATE_NAMES:
            return v
        if v.lower().endswith(".jinja"):
            if not Path(v).expanduser().is_file():
                raise ValueError(f"chat template file {v!r} not found")
            return v
        raise ValueError(
            f"unknown chat template {v!r}: expected auto, model, one of {', '.join(CHAT_TEMPLATE_NAMES)}, or a path to a .jinja file"
        )

    @property
    def is_tiny(self) -> bool:
        return self.name_or_path == "tiny" or self.name_or_path.startswith("tiny:")

    @model_validator(mode="after")
    def _gguf_file_needs_folder(self) -> "ModelConfig":
        if self.gguf_file is not None:
            if not self.gguf_file.lower().endswith(".gguf"):
                raise ValueError(f"model.gguf_file {self.gguf_file!r} must name a .gguf file")
            if self.is_tiny or self.name_or_path.lower().endswith(".gguf"):
                raise ValueError("model.gguf_file needs model.name_or_path to be the folder (or Hub repo) holding it")
        return self


# --------------------------------------------------------------------------- data
ColumnMap = dict[str, str]


class BinarizeConfig(_Strict):
    """How rows with several rated completions become (chosen, rejected) pairs."""

    strategy: Literal["best_vs_worst", "best_vs_random", "all_pairs"] = "best_vs_worst"
    score: str = Field("overall_score", description="UltraFeedback: overall_score or a fine-grained aspect mean 'annotations'")
    margin: float = Field(0.0, ge=0, description="all_pairs: minimum score difference")
    seed: int | None = Field(None, description="None: the recipe seed")


class SyntheticConfig(_Strict):
    """The project's own seeded, learnable preference set (offline default).

    ``arithmetic``: tiny tasks for the random-init smoke model (``orpo_core.data.synthetic.arithmetic``).
    ``instructions``: prompts with IFEval-style verifiable constraints
    (``orpo_core.data.synthetic.instructions``); ``n_rows`` is split into ``round(n_rows * data.test_size)``
    held-out rows, generated from (constraint combination, topic) keys that the
    training rows never use, and the rest for training.
    """

    task: Literal["arithmetic", "instructions"] = "arithmetic"
    n_rows: int = Field(2000, gt=1)
    seed: int | None = None


class OnPolicyConfig(_Strict):
    """On-policy instruction-following pairs made from the model being trained (its own stage,
    ``generate``, before prepare; :mod:`orpo_core.data.onpolicy`).

    ``n_requests`` IFEval-like requests (:mod:`orpo_core.data.synthetic.instructions.requests`, all 25
    of Google's instruction ids, 1 to ``max_instructions`` each) are answered once each by the
    base model (sampled, ``max_new_tokens`` tokens at most, through its chat template); lm-eval's
    IFEval checks judge the answers and a failing answer is paired with its minimal repair
    (chosen) against itself (rejected). Requests sharing a word 13-gram with ``decontaminate``
    (Google's 541 IFEval prompts) are never made. The generation budget is ``n_requests`` x
    ``max_new_tokens`` tokens.
    """

    task: Literal["instructions"] = "instructions"
    n_requests: int = Field(480, gt=0)
    max_new_tokens: int = Field(160, gt=0, description="tokens per sampled answer")
    temperature: float = Field(0.7, ge=0, description="0: greedy")
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: int = Field(50, ge=1, description="candidates per step (transformers' default 50)")
    batch_size: int = Field(32, gt=0, description="prompts per generate call")
    max_instructions: int = Field(3, ge=1, le=3)
    seed: int | None = Field(None, description="None: the recipe seed")
    decontaminate: str = Field(
        "../shared/data/eval/ifeval_input.jsonl",
        description="benchmark prompts (JSONL with 'prompt') no request may share a 13-gram with",
    )


class SourceConfig(_Strict):
    """One preference source. ``path`` is a Hub dataset id, a local file or a folder;
    ``synthetic`` uses the generator instead of a path; ``onpolicy`` reads the pairs of the
    run's ``generate`` stage (``<output_dir>/onpolicy/pairs.jsonl``)."""

    path: str | None = None
    synthetic: SyntheticConfig | None = None
    onpolicy: OnPolicyConfig | None = None
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
        if sum(x is not None for x in (self.path, self.synthetic, self.onpolicy)) != 1:
            raise ValueError("a source needs exactly one of 'path', 'synthetic' or 'onpolicy'")
        return self

    @property
    def display_name(self) -> str:
        if self.label:
            return self.label
        if self.synthetic is not None:
            return f"synthetic:{self.synthetic.task}"
        if self.onpolicy is not None:
            return f"onpolicy:{self.onpolicy.task}"
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
        1, ge=1, description="processes for preparation (files over one 8 MiB chunk) and tokenization (>= 1000 rows each)"
    )
    cache_dir: str | None = None
    decontaminate: str | None = Field(
        None,
        description="a benchmark's prompts (JSONL with a 'prompt' field, e.g. IFEval's input file): pairs whose prompt "
        "shares a word 13-gram with any of them are dropped ('contaminated' in stats.json)",
    )

    @model_validator(mode="after")
    def _one_onpolicy(self) -> "DataConfig":
        if sum(s.onpolicy is not None for s in self.sources) > 1:
            raise ValueError("at most one 'onpolicy' source per recipe (one generate stage per run)")
        return self

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
        description="compute each pair's prompt once ([prompt | chosen | rejected] row, orpo_core/training/sharing.py); "
        "auto: per batch when the model supports it and the estimated cost is lower by a margin (sharing_pays)",
    )
    padding_free: bool | Literal["auto"] = Field(
        "auto",
        description="pack each batch into one row without padding (orpo_core/training/packing.py); auto: on for "
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
class FsdpConfig(_Strict):
    """FSDP options of ``train.distributed`` (accelerate's ``fsdp_config``; see
    ``accelerate config`` / ``FullyShardedDataParallelPlugin``)."""

    version: Literal[1, 2] = Field(1, description="FSDP1 (FullyShardedDataParallel) or FSDP2 (fully_shard)")
    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2"] = Field(
        "FULL_SHARD", description="FSDP1 sharding strategy (FSDP2: FULL_SHARD = reshard after forward, others do not)"
    )
    auto_wrap_policy: Literal["TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP"] = "TRANSFORMER_BASED_WRAP"
    transformer_layer_cls_to_wrap: str | None = Field(
        None, description="comma-separated decoder layer classes (None: the model's _no_split_modules)"
    )
    min_num_params: int = Field(100_000_000, gt=0, description="SIZE_BASED_WRAP threshold")
    cpu_offload: bool = Field(False, description="offload parameters and gradients to CPU")
    state_dict_type: Literal["FULL_STATE_DICT", "SHARDED_STATE_DICT"] = Field(
        "FULL_STATE_DICT", description="checkpoint format (the final model is always gathered to full weights)"
    )
    activation_checkpointing: bool = False
    use_orig_params: bool = True


class DeepSpeedZeroConfig(_Strict):
    """DeepSpeed ZeRO options of ``train.distributed`` (accelerate's ``deepspeed_config``)."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer_device: Literal["none", "cpu", "nvme"] = "none"
    offload_param_device: Literal["none", "cpu", "nvme"] = Field("none", description="stage 3 only")
    offload_nvme_path: str | None = Field(None, description="folder for nvme offload")
    zero3_init_flag: bool = Field(False, description="construct the model with deepspeed.zero.Init (stage 3)")
    zero3_save_16bit_model: bool = Field(True, description="stage 3: gather 16-bit weights when saving")
    config_file: str | None = Field(None, description="a DeepSpeed JSON config to use instead of the options above")

    @model_validator(mode="after")
    def _offload(self) -> "DeepSpeedZeroConfig":
        if self.offload_param_device != "none" and self.zero_stage != 3:
            raise ValueError("offload_param_device needs zero_stage 3")
        if self.offload_optimizer_device != "none" and self.zero_stage < 1:
            raise ValueError("offload_optimizer_device needs zero_stage >= 1")
        if "nvme" in (self.offload_param_device, self.offload_optimizer_device) and not self.offload_nvme_path:
            raise ValueError("nvme offload needs offload_nvme_path")
        return self


class DistributedConfig(_Strict):
    """Several training processes (``accelerate launch``, written by :mod:`orpo_core.training.launch`).

    ``num_processes`` is the total over all machines (accelerate's meaning); ``auto`` is the
    number of visible CUDA GPUs times ``num_machines`` (1 on a CPU-only host). One process on
    one machine trains in the calling process, as without this section.
    """

    num_processes: int | Literal["auto"] = Field(1, description="total processes (int >= 1) or 'auto' = visible GPUs")
    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    num_machines: int = Field(1, ge=1)
    machine_rank: int = Field(0, ge=0, description="this machine's rank (0 = the one at main_process_ip)")
    main_process_ip: str | None = Field(None, description="address of machine 0 (needed when num_machines > 1)")
    main_process_port: int | None = Field(
        None, ge=0, le=65535, description="rendezvous port (None: a free port on one machine, 29500 on several)"
    )
    fsdp: FsdpConfig = Field(default_factory=FsdpConfig)
    deepspeed: DeepSpeedZeroConfig = Field(default_factory=DeepSpeedZeroConfig)

    @field_validator("num_processes")
    @classmethod
    def _num_processes(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("num_processes must be >= 1 or 'auto'")
        return v

    @model_validator(mode="after")
    def _topology(self) -> "DistributedConfig":
        if self.machine_rank >= self.num_machines:
            raise ValueError(f"machine_rank ({self.machine_rank}) must be < num_machines ({self.num_machines})")
        if self.num_machines > 1:
            if not self.main_process_ip:
                raise ValueError("num_machines > 1 needs main_process_ip (address of machine_rank 0)")
            if isinstance(self.num_processes, int) and self.num_processes % self.num_machines:
                raise ValueError(
                    f"num_processes ({self.num_processes}) is the total over machines and must be a multiple "
                    f"of num_machines ({self.num_machines})"
                )
        if self.num_processes == 1 and self.num_machines == 1 and self.strategy != "ddp":
            raise ValueError(f"strategy {self.strategy} needs num_processes >= 2 (1 process trains in-process, unsharded)")
        return self


class TrainConfig(_Strict):
    learning_rate: float = Field(8e-6, gt=0)
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    optim: str = Field(
        "adamw_torch_fused",
        description="TrainingArguments.optim (transformers' and TRL's default); the fused AdamW kernel is the "
        "same update as adamw_torch without its per-parameter temporaries (3.5x faster on CPU, SmolLM2-135M)",
    )
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1)
    per_device_train_batch_size: int = Field(2, gt=0)
    per_device_eval_batch_size: int = Field(4, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    gradient_checkpointing: bool = False
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 autocast (float32 master weights) on a CUDA GPU with bf16 support or a CPU with "
        "avx512_bf16/amx_bf16, fp32 otherwise (orpo_core.models.precision; ORPO_CPU_BF16=0/1 forces the CPU check)",
    )
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
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="processes / machines and DDP, FSDP or DeepSpeed ZeRO"
    )


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
    lm_eval_max_gen_toks: int | None = Field(
        None, gt=0, description="cap on tokens generated by lm-eval generation tasks (ifeval: 1280 upstream)"
    )
    lm_eval_chat_template: bool = Field(False, description="lm-eval prompts through the tokenizer's chat template")
    instructions: bool = Field(
        True, description="greedy answers to held-out prompts with verifiable constraints, scored IFEval-style"
    )
    max_instructions: int | None = Field(100, gt=0, description="cap on held-out instruction prompts answered")
    instruction_examples: int = Field(4, ge=0, description="instruction answers shown side by side in eval.md")
    batch_size: int = Field(8, gt=0)
    generation_batch_size: int | None = Field(
        None, gt=0, description="prompts per generate call for lm-eval and instruction answers (None: batch_size)"
    )
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
    gguf: list[str] = Field(
        default_factory=list,
        description="GGUF files for llama.cpp built into the Hub folder by the push stage (f32, f16, q8_0; "
        "orpo_core.publish.gguf); empty: none",
    )

    @field_validator("gguf")
    @classmethod
    def _gguf(cls, v: list[str]) -> list[str]:
        out: list[str] = []
        for raw in v:
            q = str(raw).strip().lower()
            if q not in GGUF_TYPES:
                raise ValueError(f"unknown GGUF type {raw!r}: expected one of {', '.join(GGUF_TYPES)}")
            if q not in out:
                out.append(q)
        return out

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

    @field_validator("run_name")
    @classmethod
    def _safe_run_name(cls, v: str) -> str:
        """A run name is one folder name: letters, digits, ``.``, ``_``, ``+``, ``-``; no path
        separator, no ``..``, no leading dot (it becomes part of ``output_dir``)."""
        if not RUN_NAME_RE.fullmatch(v) or ".." in v:
            raise ValueError(
                f"run_name {v!r} is not a safe folder name: use letters, digits, '.', '_', '+', '-' "
                "(at most 128, starting with a letter or digit; no '/', no '..'); put the folder in output_dir"
            )
        return v

    @property
    def out_dir(self) -> Path:
        """The run folder: ``output_dir`` with ``${run_name}`` filled in, ``~`` expanded, made
        absolute against the current working directory (what the CLI prints and results report)."""
        return Path(os.path.abspath(os.path.expanduser(self.output_dir.replace("${run_name}", self.run_name))))

    def require_model(self) -> ModelConfig:
        """Return ``model`` or raise :class:`RecipeError` for a data-only recipe."""
        if self.model is None:
            raise RecipeError("this command needs a 'model' section in the recipe")
        return self.model

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
        RecipeError: an override without ``=``, or one carrying a secret (:func:`check_no_secrets`).
    """
    out = copy.deepcopy(data)
    if not overrides:
        return out
    check_no_secrets(overrides)
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


def _keys_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys the recipe schema accepts in the mapping at ``loc`` (``("data", "sources", 0)``), or []."""
    import inspect
    import types
    import typing

    def options(t: Any) -> list[Any]:
        if typing.get_origin(t) in (typing.Union, types.UnionType):
            return [o for a in typing.get_args(t) for o in options(a)]
        return [t]

    t: Any = Recipe
    for part in loc:
        nxt = None
        for o in options(t):
            if isinstance(part, int) and typing.get_origin(o) in (list, tuple):
                nxt = typing.get_args(o)[0]
            elif isinstance(part, str) and inspect.isclass(o) and issubclass(o, BaseModel) and part in o.model_fields:
                nxt = o.model_fields[part].annotation
            if nxt is not None:
                break
        if nxt is None:
            return []
        t = nxt
    return [k for o in options(t) if inspect.isclass(o) and issubclass(o, BaseModel) for k in o.model_fields]


def _format_errors(err: ValidationError, where: str) -> str:
    import difflib

    lines = [f"invalid recipe {where}:"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            key = e["loc"][-1] if e["loc"] else None
            if isinstance(key, str):
                close = difflib.get_close_matches(key, _keys_at(tuple(e["loc"][:-1])), n=1, cutoff=0.6)
                if close:
                    msg += f" (did you mean {close[0]!r}?)"
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

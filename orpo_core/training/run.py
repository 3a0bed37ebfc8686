"""Training stage: tokenized pairs -> trained ORPO model.

:func:`run_training` reads ``tokenized/`` (``train.parquet``, ``test.parquet``,
``tokenizer/``, ``stats.json``), checks it before anything heavy is loaded, builds
``TrainingArguments`` from ``recipe.train``, trains :class:`orpo_core.training.trainer.ORPOTrainer`
(resuming from the latest complete checkpoint when asked), evaluates on the test
split and writes, under ``out_dir``::

    model/              final model (full weights, merged LoRA, or adapter; see
                        orpo_core.models.loading.save_trained_model) + tokenizer + chat template
    adapter/            LoRA/QLoRA adapter when train.save_merged
    checkpoints/        checkpoint-N/ folders (Trainer format) + run_signature.json
    metrics.json        train metrics, final eval metrics, steps, model info
    log_history.json    Trainer's log_history (one record per logging/eval step)

It works the same under ``accelerate launch`` (several processes, DDP): every
process trains its shard of each batch, process 0 writes the files.
"""

from __future__ import annotations


import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from orpo_core.training.collator import REQUIRED_COLUMNS, ORPODataCollator, pair_lengths
from orpo_core.stages import fields_hash
from orpo_core.config import Recipe
from orpo_core.io import read_json
from orpo_core.models.sources import resolve_model_path
from orpo_core.models.host_memory import retained_heap
from orpo_core.models.precision import resolve_precision

logger = logging.getLogger(__name__)

__all__ = [
    "TrainInputError", "run_training", "build_training_args", "training_precision", "latest_checkpoint", "run_signature",
]

_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


class TrainInputError(ValueError):
    """The tokenized input or the checkpoint folder cannot be used for this recipe
    (missing files or columns, tokenizer mismatch, checkpoints of another run)."""


# --------------------------------------------------------------------------- helpers
def _write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default), encoding="utf-8")
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    return str(o)


#: ``train.*`` recipe fields that are TrainingArguments of the same name and meaning
_SAME_NAME_ARGS = (
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "learning_rate",
    "lr_scheduler_type", "weight_decay", "max_grad_norm", "optim", "num_train_epochs", "max_steps", "logging_steps",
    "save_total_limit", "dataloader_num_workers",
)


def _read_stats(tokenized_dir: Path) -> dict[str, Any]:
    path = tokenized_dir / "stats.json"
    stats = read_json(path, TrainInputError, " (run the tokenize stage first)")
    tok = stats.get("tokenizer")
    if not isinstance(tok, dict) or "added_tokens" not in tok:
        raise TrainInputError(f"{path}: field 'tokenizer.added_tokens' is missing")
    return stats


def _check_columns(dataset, path: Path) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise TrainInputError(f"{path}: missing column(s) {missing} (found {dataset.column_names})")
    if len(dataset) == 0:
        raise TrainInputError(f"{path}: no rows")
    lengths = [(len(p), len(c), len(r)) for p, c, r in zip(
        dataset["prompt_input_ids"], dataset["chosen_input_ids"], dataset["rejected_input_ids"]
    )]
    for i, (lp, lc, lr) in enumerate(lengths):
        for name, n in (("prompt_input_ids", lp), ("chosen_input_ids", lc), ("rejected_input_ids", lr)):
            if n == 0:
                raise TrainInputError(f"{path}: row {i}: field '{name}' is empty")


def _with_bookkeeping(dataset):
    """Add ``row_index`` (position in the split, names rows in errors) and ``length``
    (pair length for length-grouped batching)."""
    lengths = pair_lengths(dataset)
    if "row_index" not in dataset.column_names:
        dataset = dataset.add_column("row_index", list(range(len(dataset))))
    if "length" not in dataset.column_names:
        dataset = dataset.add_column("length", lengths)
    return dataset


def _checkpoint_complete(path: Path) -> bool:
    if not (path / "trainer_state.json").is_file():
        return False
    # DeepSpeed keeps weights and optimizer in global_step<N>/ (scheduler included); FSDP writes
    # pytorch_model_fsdp.bin + optimizer.bin (FULL_STATE_DICT) or pytorch_model_fsdp_0/ + optimizer_0/ (SHARDED)
    deepspeed = any(p.is_dir() for p in path.glob("global_step*"))
    has_weights = deepspeed or any(path.glob("*.safetensors")) or any(path.glob("*.bin")) or any(path.glob("pytorch_model_fsdp_*"))
    has_opt = deepspeed or (
        ((path / "optimizer.pt").is_file() or (path / "optimizer.bin").is_file() or any(path.glob("optimizer_*")))
        and (path / "scheduler.pt").is_file()
    )
    has_rng = any(path.glob("rng_state*.pth"))
    return has_weights and has_opt and has_rng


def latest_checkpoint(ckpt_dir: str | Path, remove_incomplete: bool = False) -> str | None:
    """Path of the highest-numbered **complete** ``checkpoint-N`` in ``ckpt_dir`` (weights,
    optimizer, scheduler, RNG state and ``trainer_state.json``, which Trainer writes
    last), or None. A checkpoint cut short by a kill is skipped (and deleted when
    ``remove_incomplete``)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return None
    found = []
    for p in d.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    for _, p in sorted(found, reverse=True):
        if _checkpoint_complete(p):
            return str(p)
        logger.warning("checkpoint %s is incomplete (interrupted while saving); ignoring it", p)
        if remove_incomplete:
            shutil.rmtree(p, ignore_errors=True)
    return None


def run_signature(recipe: Recipe, stats: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: the hash of the recipe sections that
    shape training (the train stage's fields, :data:`orpo_core.stages.STAGES`) and the tokenized data fingerprint."""
    tok = stats.get("tokenizer", {})
    tokenization = stats.get("tokenization") or {}
    data_fp = {
        "tokenizer": tok.get("fingerprint"),
        "rows": {s: (tokenization.get(s) or {}).get("rows_out") for s in ("train", "test")},
    }
    return {
        "recipe_hash": fields_hash(recipe, "train"),
        "data": data_fp,
    }


def _cuda() -> bool:
    return torch.cuda.is_available()


def training_precision(recipe: Recipe) -> tuple[str, str]:
    """``(precision, reason)`` this process trains in: ``recipe.train.precision`` with ``auto``
    resolved by :func:`orpo_core.models.precision.resolve_precision` for this device (CUDA when
    available, else CPU): ``bf16`` mixed precision (autocast, float32 master weights) where
    the hardware has native bf16, else ``fp32``.

    Raises:
        ValueError: ``ORPO_CPU_BF16`` set to something other than 1/0.
    """
    return resolve_precision(recipe.train.precision, "cuda" if _cuda() else "cpu")


def build_training_args(recipe: Recipe, out_dir: str | Path, has_eval: bool):
    """``TrainingArguments`` from ``recipe.train`` (see module docstring of
    :mod:`orpo_core.training.run`). ``output_dir`` is ``out_dir/checkpoints``. ``bf16``/``fp16``
    (from :func:`training_precision`) make Trainer (accelerate) run the model's forward under
    ``torch.autocast`` in that dtype on CPU or CUDA, with the weights and optimizer states in
    the dtype the model was loaded in (``model.dtype``; float32 for ``auto`` on CPU).

    Raises:
        TrainInputError: ``train.precision: fp16``/``bf16`` that the hardware cannot run.
    """
    from transformers import TrainingArguments

    t = recipe.train
    cuda = _cuda()
    precision, _ = training_precision(recipe)
    if precision == "fp16" and not cuda:
        raise TrainInputError("train.precision fp16 needs a CUDA GPU (use fp32 or bf16 on CPU)")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise TrainInputError("train.precision bf16: this GPU has no bfloat16 support (use fp16 or fp32)")
    seed = t.seed if t.seed is not None else recipe.seed
    if t.warmup_steps > 0:
        warmup: float = int(t.warmup_steps)
    else:
        warmup = min(float(t.warmup_ratio), 0.999999)
    eval_on = has_eval and t.eval_steps is not None
    # recipe fields named as TrainingArguments names them, passed as they are
    kwargs: dict[str, Any] = {name: getattr(t, name) for name in _SAME_NAME_ARGS}
    kwargs.update(
        output_dir=str(Path(out_dir) / "checkpoints"),
        warmup_steps=warmup,
        logging_strategy="steps",
        logging_first_step=True,
        eval_strategy="steps" if eval_on else "no",
        eval_steps=t.eval_steps if eval_on else None,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps if t.save_steps else 500,
        save_only_model=False,
        seed=seed,
        data_seed=seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not cuda,
        report_to=list(t.report_to) if t.report_to else "none",
        disable_tqdm=False,
        remove_unused_columns=False,
        label_names=[],
        dataloader_pin_memory=cuda,
        push_to_hub=False,
        hub_token=None,
    )
    if t.report_to:  # run name (and trackio's local project) for the trackers (orpo_core.training.trackers)
        from .trackers import training_args_kwargs

        kwargs.update(training_args_kwargs(list(t.report_to), recipe.run_name))
    return TrainingArguments(**kwargs)


def build_trainer(recipe: Recipe, model, tokenizer, args, train_ds, eval_ds=None, collator=None,
                  callbacks: list | None = None):
    """The :class:`orpo_core.training.trainer.ORPOTrainer` of a recipe: its ``orpo`` section and ``train.group_by_length``.

    Args:
        model, tokenizer: from :func:`orpo_core.models.loading.load_model` and the run's tokenizer.
        args: :func:`build_training_args`' TrainingArguments.
        train_ds, eval_ds: tokenized pair datasets (:data:`orpo_core.training.collator.REQUIRED_COLUMNS`).
        collator: default :class:`ORPODataCollator` padding with the tokenizer's pad id (else eos).
        callbacks: extra TrainerCallbacks (e.g. the Prefect progress callback).
    """
    from orpo_core.training.trainer import ORPOTrainer

    if collator is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        collator = ORPODataCollator(pad_token_id=pad_id)
    return ORPOTrainer(model=model, args=args, orpo=recipe.orpo, group_by_length=recipe.train.group_by_length,
                       train_dataset=train_ds, eval_dataset=eval_ds, data_collator=collator, processing_class=tokenizer,
                       callbacks=list(callbacks or []))


# --------------------------------------------------------------------------- entry point
def run_training(
    recipe: Recipe,
    tokenized_dir: str | Path,
    out_dir: str | Path,
    resume: bool = True,
    callbacks: list | None = None,
) -> dict[str, Any]:
    """Train an ORPO model on a tokenized preference dataset.

    Args:
        recipe: validated recipe (``model``, ``orpo``, ``train``, ``peft``, ``seed``).
        tokenized_dir: output folder of :func:`orpo_core.data.tokenize.tokenize_dataset`.
        out_dir: stage folder (normally ``recipe.out_dir / "train"``).
        resume: True: continue from the latest complete ``out_dir/checkpoints/checkpoint-N``
            when there is one (Trainer restores weights, optimizer, scheduler, RNG state and
            the data position, so the result equals an uninterrupted run). False: delete
            existing checkpoints and start over.
        callbacks: extra ``transformers.TrainerCallback`` objects.

    Returns:
        The metrics written to ``metrics.json``: ``train`` (Trainer's train metrics:
        ``train_loss``, runtime...), ``eval`` (final ``eval_loss`` and ``eval_`` TRL
        metrics; empty without a test split), ``last_train_log`` (the last logged
        train metrics), ``global_step``, ``skipped_nonfinite``, ``resumed_from``,
        ``num_train_pairs``, ``num_eval_pairs``, ``precision`` (``setting``: the recipe's
        ``train.precision``; ``used``: fp32/bf16/fp16; ``reason``; ``autocast``;
        ``trainable_dtype``: dtype of the trained (master) weights), ``model`` (see
        :func:`orpo_core.models.loading.save_trained_model`), ``heap_retained`` (whether freed host
        memory stayed in the process during training: :mod:`orpo_core.models.host_memory`).

    Raises:
        TrainInputError: missing/invalid tokenized files, tokenizer mismatch, or resumable
            checkpoints of a different recipe.
        orpo_core.models.loading.ModelLoadError: the model cannot be loaded.
        orpo_core.training.trainer.NonFiniteLossError: NaN/inf loss with ``orpo.on_nonfinite: raise``.
    """
    from transformers import AutoTokenizer

    from orpo_core.data.tokenize import check_tokenizer_matches, load_tokenized
    from orpo_core.models.loading import load_model, save_trained_model

    recipe.require_model()
    tokenized_dir = Path(tokenized_dir)
    out_dir = Path(out_dir)
    if not tokenized_dir.is_dir():
        raise TrainInputError(f"tokenized folder {tokenized_dir} does not exist (run the tokenize stage first)")
    stats = _read_stats(tokenized_dir)
    tok_dir = tokenized_dir / "tokenizer"
    if not tok_dir.is_dir():
        raise TrainInputError(f"{tok_dir}: missing (the tokenize stage saves the tokenizer it used there)")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    try:
        check_tokenizer_matches(tokenized_dir, tokenizer)
    except ValueError as e:
        raise TrainInputError(str(e)) from None
    train_path = tokenized_dir / "train.parquet"
    if not train_path.is_file():
        raise TrainInputError(f"{train_path}: missing")
    train_ds = load_tokenized(tokenized_dir, "train")
    _check_columns(train_ds, train_path)
    eval_ds = None
    test_path = tokenized_dir / "test.parquet"
    if test_path.is_file():
        eval_ds = load_tokenized(tokenized_dir, "test")
        if len(eval_ds) == 0:
            eval_ds = None
        else:
            _check_columns(eval_ds, test_path)
    train_ds = _with_bookkeeping(train_ds)
    if eval_ds is not None:
        eval_ds = _with_bookkeeping(eval_ds)
    added_tokens = bool(stats["tokenizer"]["added_tokens"])

    args = build_training_args(recipe, out_dir, has_eval=eval_ds is not None)
    logger.info("precision: %s (%s)", "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32", training_precision(recipe)[1])
    is_main = args.process_index == 0
    ckpt_dir = Path(args.output_dir)
    signature = run_signature(recipe, stats)
    sig_path = ckpt_dir / "run_signature.json"
    resume_from = None
    if resume:
        resume_from = latest_checkpoint(ckpt_dir, remove_incomplete=False)
        if resume_from is not None and sig_path.is_file():
            old = json.loads(sig_path.read_text(encoding="utf-8"))
            if old != signature:
                raise TrainInputError(
                    f"{ckpt_dir}: checkpoints were made with other settings or data "
                    f"(signature {old} != {signature}); train with resume=False (--no-resume) to start over"
                )
    _barrier(args)
    if is_main:
        # build a ``tiny`` base once, before other processes load it
        resolve_model_path(recipe.model, recipe.out_dir, seed=recipe.seed)
        if resume_from is None and ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
        elif resume_from is not None:
            latest_checkpoint(ckpt_dir, remove_incomplete=True)
        _write_json_atomic(sig_path, signature)
    _barrier(args)
    if resume_from:
        logger.info("resuming from %s", resume_from)

    model = load_model(recipe, tokenizer, added_tokens, for_training=True, work_dir=recipe.out_dir)
    pad_multiple = recipe.train.pad_to_multiple_of
    if pad_multiple is None and _cuda():
        pad_multiple = 8
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = ORPODataCollator(pad_token_id=pad_id, pad_to_multiple_of=pad_multiple)

    from .trackers import offline_tracking_env, record_tracker_runs

    report_to = list(recipe.train.report_to or [])
    # the tracker environment (local stores under out_dir/tracking) is process-wide: set for training only
    # CPU: keep freed activations / buffers in the heap instead of page-faulting them in every step
    with retained_heap(enabled=not _cuda()) as heap_retained, \
            offline_tracking_env(report_to, out_dir, recipe.run_name) as tracker_env:
        trainer = build_trainer(recipe, model, tokenizer, args, train_ds, eval_ds, collator, callbacks)
        train_result = trainer.train(resume_from_checkpoint=resume_from)
        eval_metrics: dict[str, float] = {}
        if eval_ds is not None:
            last = [r for r in trainer.state.log_history if "eval_loss" in r]
            if last and last[-1].get("step") == trainer.state.global_step:
                # evaluated at the final step already (eval_steps): reuse instead of a second pass
                eval_metrics = {k: v for k, v in last[-1].items() if k != "step"}
            else:
                eval_metrics = dict(trainer.evaluate())

    train_logs = [r for r in trainer.state.log_history if "loss" in r]
    result: dict[str, Any] = {
        "train": dict(train_result.metrics),
        "eval": eval_metrics,
        "last_train_log": train_logs[-1] if train_logs else {},
        "global_step": trainer.state.global_step,
        "skipped_nonfinite": trainer.total_skipped_nonfinite(),
        "resumed_from": resume_from,
        "num_train_pairs": len(train_ds),
        "num_eval_pairs": len(eval_ds) if eval_ds is not None else 0,
        "peft": recipe.peft.method,
        "fused_loss": trainer.use_fused,
        "padding_free": trainer.padding_free,
        "prompt_sharing": trainer.prompt_sharing,
        "precision": _precision_record(recipe, trainer.args, trainer.model),
        "heap_retained": heap_retained,
    }
    trainer.accelerator.wait_for_everyone()
    state_dict = None
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        # sharded parameters (FSDP, ZeRO-3): gather the full state dict, a collective on every rank
        state_dict = trainer.accelerator.get_state_dict(trainer.model)
    if trainer.is_world_process_zero():
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        result["model"] = save_trained_model(unwrapped, tokenizer, recipe, out_dir, work_dir=recipe.out_dir, state_dict=state_dict)
        _write_json_atomic(out_dir / "log_history.json", trainer.state.log_history)
        if report_to:  # where each tracker logged this run (trackers.json, shown by the train task)
            result["trackers"] = record_tracker_runs(report_to, out_dir, recipe.run_name, tracker_env)
        _write_json_atomic(out_dir / "metrics.json", result)
    trainer.accelerator.wait_for_everyone()
    return result


def _precision_record(recipe: Recipe, args, model) -> dict[str, Any]:
    """What metrics.json says about precision: the recipe's setting, the precision used, why,
    and the dtype of the trainable weights (the master weights under autocast)."""
    _, reason = training_precision(recipe)
    used = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters() if p.requires_grad})
    return {
        "setting": recipe.train.precision,
        "used": used,
        "reason": reason,
        "autocast": used != "fp32",
        "trainable_dtype": ",".join(dtypes),
    }


def _barrier(args) -> None:
    if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()

"""Worker processes: one trainer (TRL or ours), timed steps, memory; the result as JSON."""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

from trainbench.flops import matmul_peak_flops, model_shape
from trainbench.inputs import prepare_inputs
from trainbench.memory import maxrss_mib, new_record, record_batch, recorder, rss_now_mib

def _worker_common_start(spec: dict[str, Any], rec: dict[str, Any]) -> dict[str, Any]:
    """Thread count, RSS after imports, then the matmul probe (its ~60 MiB transient is far below the
    training peak, so it does not change the reported peak)."""
    import torch

    torch.set_num_threads(int(spec["threads"]))
    rec["rss"]["imports"] = {"now": rss_now_mib(), "max": maxrss_mib()}
    out: dict[str, Any] = {"pid": os.getpid(), "threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()}
    dtype_name = "bfloat16" if spec.get("precision") == "bf16" else "float32"
    out["matmul"] = matmul_peak_flops(n=spec["matmul_n"], reps=spec["matmul_reps"], device=spec.get("device", "cpu"),
                                      dtype_name=dtype_name)
    if spec.get("device") == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the probe's matrices are not training memory
    return out


def _worker_trl(spec: dict[str, Any]) -> dict[str, Any]:
    t_start = time.perf_counter()
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    rec = new_record()
    res = _worker_common_start(spec, rec)
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    bf16 = spec.get("precision") == "bf16"
    weights_bf16 = bf16 and bool(spec.get("bf16_weights"))  # default: float32 master weights + bf16 autocast
    model = AutoModelForCausalLM.from_pretrained(
        spec["model_dir"], dtype=torch.bfloat16 if weights_bf16 else torch.float32, attn_implementation="sdpa"
    )
    rec["rss"]["model_loaded"] = {"now": rss_now_mib(), "max": maxrss_mib()}
    ds = Dataset.from_list(spec["trl_rows"])
    max_steps = spec["warmup"] + spec["steps"]
    cfg = ORPOConfig(
        output_dir=str(Path(spec["run_dir"]) / "trl_output"),
        max_length=spec["max_length"],
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1,
        beta=spec["beta"],
        learning_rate=spec["lr"],
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim=spec["optim"],
        max_steps=max_steps,
        logging_steps=max_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=spec.get("device", "cpu") == "cpu",
        bf16=bf16,  # TRL's default is bf16=True (mixed precision) unless fp16: set explicitly
        fp16=False,
        gradient_checkpointing=bool(spec.get("gradient_checkpointing")),  # TRL's default is True: always explicit
        gradient_checkpointing_kwargs={"use_reentrant": False},  # as ours (orpo_core.models.loading)
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        disable_dropout=True,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        seed=spec["seed"],
        data_seed=spec["seed"],
    )

    class BenchORPOTrainer(ORPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            lengths = torch.cat([inputs["chosen_attention_mask"].sum(1), inputs["rejected_attention_mask"].sum(1)])
            width = max(inputs["chosen_input_ids"].shape[1], inputs["rejected_input_ids"].shape[1])
            record_batch(rec, lengths.tolist(), width)
            out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            loss = out[0] if isinstance(out, tuple) else out
            rec["losses"].append(float(loss.detach()))
            return out

    t0 = time.perf_counter()
    peft_config = None
    if spec.get("peft") == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                                 target_modules=spec["lora_target_modules"], task_type="CAUSAL_LM")
    trainer = BenchORPOTrainer(
        model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[recorder(rec, bool(spec.get("heap")))],
        peft_config=peft_config,
    )
    res["init_s"] = time.perf_counter() - t0  # includes TRL's tokenization of the rows
    empty = sum(1 for lab in trainer.train_dataset["chosen_labels"] if all(x == -100 for x in lab))
    res["trl_rows_with_empty_completion"] = empty
    rec["rss"]["trainer_ready"] = {"now": rss_now_mib(), "max": maxrss_mib()}
    trainer.train()
    res["global_step"] = trainer.state.global_step
    res["log_history"] = trainer.state.log_history
    res["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}
    res["worker_s"] = time.perf_counter() - t_start
    return {**res, **rec}


def _worker_ours(spec: dict[str, Any], fused: bool, prompt_sharing: bool = False) -> dict[str, Any]:
    t_start = time.perf_counter()
    import torch
    import transformers
    from torch.utils.data import SequentialSampler

    import orpo_core.training.trainer as ot
    from orpo_core.config import recipe_from_dict
    from orpo_core.training.run import run_training

    rec = new_record()
    res = _worker_common_start(spec, rec)
    base_cls = ot.ORPOTrainer

    class BenchORPOTrainer(base_cls):
        """Sequential sampling (the same batches as TRL) and per-batch token accounting."""

        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            am = inputs["attention_mask"]
            record_batch(rec, am.sum(1).tolist(), int(am.shape[1]))
            out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            loss = out[0] if isinstance(out, tuple) else out
            rec["losses"].append(float(loss.detach()))
            return out

    # run_training imports ORPOTrainer from orpo_core.training.trainer when called: this substitutes the subclass
    ot.ORPOTrainer = BenchORPOTrainer
    max_steps = spec["warmup"] + spec["steps"]
    run_dir = Path(spec["run_dir"])
    recipe = recipe_from_dict(
        {
            "run_name": run_dir.name,
            "output_dir": str(run_dir),
            "seed": spec["seed"],
            "model": {"name_or_path": spec["model_dir"],
                      "dtype": "bfloat16" if spec.get("precision") == "bf16" and spec.get("bf16_weights") else "float32",
                      "attn_implementation": "sdpa"},
            "data": {
                "sources": [{"path": spec["data_path"]}],
                "test_size": 0.0,
                "max_length": spec["max_length"],
                "max_prompt_length": spec["max_prompt_length"],
            },
            "orpo": {"beta": spec["beta"], "alpha": 1.0, "fused_loss": fused, "prompt_sharing": prompt_sharing,
                     **({"chunk_size": spec["chunk_size"]} if spec.get("chunk_size") else {})},
            "train": {
                "learning_rate": spec["lr"],
                "lr_scheduler_type": "linear",
                "warmup_steps": 0,
                "weight_decay": 0.0,
                "max_grad_norm": 1.0,
                "optim": spec["optim"],
                "max_steps": max_steps,
                "per_device_train_batch_size": spec["batch"],
                "gradient_accumulation_steps": 1,
                "gradient_checkpointing": bool(spec.get("gradient_checkpointing")),
                "precision": spec.get("precision", "fp32"),
                "logging_steps": max_steps,
                "eval_steps": None,
                "save_steps": None,
                "disable_dropout": True,
                "group_by_length": False,
                "dataloader_num_workers": 0,
                "report_to": [],
            },
            "peft": ({"method": "lora", "r": spec["lora_r"], "lora_alpha": spec["lora_alpha"], "lora_dropout": 0.0,
                      "target_modules": spec["lora_target_modules"]} if spec.get("peft") == "lora" else {"method": "none"}),
            "eval": {"bootstrap_samples": 0},
        },
        where="<bench_train>",
    )
    t0 = time.perf_counter()
    result = run_training(recipe, spec["tokenized_dir"], run_dir / "train", resume=False, callbacks=[recorder(rec, bool(spec.get("heap")))])
    res["run_training_s"] = time.perf_counter() - t0
    if len(rec["batches"]) != max_steps:
        raise RuntimeError(
            f"expected {max_steps} batches through BenchORPOTrainer.compute_loss, saw {len(rec['batches'])} "
            "(did run_training stop importing ORPOTrainer from orpo_core.training.trainer at call time?)"
        )
    res["global_step"] = result.get("global_step")
    res["fused_loss_used"] = result.get("fused_loss")
    res["log_history"] = json.loads((run_dir / "train" / "log_history.json").read_text())
    res["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    res["worker_s"] = time.perf_counter() - t_start
    return {**res, **rec}


def worker_main(kind: str, spec_path: str, result_path: str) -> None:
    """Entry of a worker process: run one variant, write its raw measurements as JSON.

    ``prepare`` instead reads the benchmark options from ``spec_path`` and writes the worker spec
    (:func:`prepare_inputs` plus the model shape) to ``result_path``."""
    spec = json.loads(Path(spec_path).read_text())
    if kind == "prepare":
        ns = argparse.Namespace(**spec)
        out = prepare_inputs(ns, Path(ns.work))
        out["shape"] = model_shape(out["model_dir"])
        tmp = Path(result_path + ".tmp")
        tmp.write_text(json.dumps(out))
        os.replace(tmp, result_path)
        return
    spec["run_dir"] = str(Path(result_path).with_suffix(""))
    if kind == "trl":
        res = _worker_trl(spec)
    elif kind in ("ours", "ours-unfused", "ours-shared"):
        res = _worker_ours(spec, fused=(kind != "ours-unfused"), prompt_sharing=(kind == "ours-shared"))
    elif kind == "ours-fp32":  # ours in fp32 (matmul probe too) in a --precision bf16 run
        spec["precision"] = "fp32"
        res = _worker_ours(spec, fused=True)
    else:
        raise SystemExit(f"unknown worker kind {kind!r}")
    res["kind"] = kind
    res["loadavg_end"] = os.getloadavg()
    res["rss"]["end"] = {"now": rss_now_mib(), "max": maxrss_mib()}
    res["maxrss_self_mib"] = maxrss_mib(resource.RUSAGE_SELF)
    res["maxrss_children_mib"] = maxrss_mib(resource.RUSAGE_CHILDREN)
    res["peak_rss_mib"] = res["maxrss_self_mib"] + res["maxrss_children_mib"]
    tmp = Path(result_path + ".tmp")
    tmp.write_text(json.dumps(res, default=str))
    os.replace(tmp, result_path)

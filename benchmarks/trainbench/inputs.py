"""The benchmark's inputs, built once by the ``prepare`` worker: model folder, rows for both trainers."""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

from trainbench import MODEL_SHAPE

def prepare_inputs(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Build the model, prepare and tokenize the rows once, write the worker spec (see module docstring).

    Raises:
        FileNotFoundError: the data file or the shared GPT-2 tokenizer is missing.
        RuntimeError: too few pairs with a prompt under ``max_prompt_length``, or the subset's
            tokenization does not reproduce the full run's rows.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orpo_core.config import ModelConfig, TinyModelConfig, recipe_from_dict
    from orpo_core.data.prepare import prepare_dataset
    from orpo_core.data.tokenize import tokenize_dataset
    from orpo_core.models.sources import resolve_model_source
    from orpo_core.models.tiny import build_tiny_model

    data_path = Path(args.data)
    if not data_path.is_file():
        raise FileNotFoundError(f"benchmark data {data_path} not found (the shared data folder is needed)")
    origin = None
    if args.model == "tiny":
        model_dir = build_tiny_model(TinyModelConfig(**MODEL_SHAPE), work / "model", seed=args.model_seed)
        if args.vocab_size is not None:
            resize_vocab(model_dir, args.vocab_size, seed=args.model_seed)
    else:  # a folder, a .gguf file or a packaged name, resolved (and converted once) as the pipeline does
        resolved = resolve_model_source(ModelConfig(name_or_path=args.model), work)
        model_dir, origin = Path(resolved.path), resolved.origin

    def recipe(run: Path, path: Path):
        return recipe_from_dict(
            {
                "run_name": run.name,
                "output_dir": str(run),
                "seed": args.seed,
                "model": {"name_or_path": str(model_dir), "dtype": "float32"},
                "data": {
                    "sources": [{"path": str(path)}],
                    "test_size": 0.0,
                    "max_length": args.max_length,
                    "max_prompt_length": args.max_prompt_length,
                },
            },
            where="<bench_train>",
        )

    full = work / "full"
    r_full = recipe(full, data_path)
    prepare_dataset(r_full, full / "data")
    tstats = tokenize_dataset(r_full, full / "data", full / "tokenized")
    tr = tstats["tokenization"]["train"]
    if tr["rows_in"] != tr["rows_out"]:
        raise RuntimeError(
            f"tokenization dropped rows ({tr['dropped']}): tokenized rows no longer align with data rows"
        )
    data_tab = pq.read_table(full / "data" / "train.parquet")
    tok_tab = pq.read_table(full / "tokenized" / "train.parquet")
    prompt_lens = [len(x) for x in tok_tab.column("prompt_input_ids").to_pylist()]
    eligible = [i for i, n in enumerate(prompt_lens) if n < args.max_prompt_length]
    n_needed = (args.warmup + args.steps) * args.batch
    if len(eligible) < n_needed:
        raise RuntimeError(f"only {len(eligible)} pairs have a prompt under {args.max_prompt_length} tokens; {n_needed} needed")
    chosen = sorted(random.Random(args.seed).sample(eligible, n_needed))

    bench = work / "bench"
    (bench / "data").mkdir(parents=True, exist_ok=True)
    sub = data_tab.take(pa.array(chosen))
    pq.write_table(sub, bench / "data" / "train.parquet", compression="zstd")
    pq.write_table(sub.slice(0, 0), bench / "data" / "test.parquet", compression="zstd")
    r_bench = recipe(bench, bench / "data" / "train.parquet")
    tokenize_dataset(r_bench, bench / "data", bench / "tokenized")
    sub_tok = pq.read_table(bench / "tokenized" / "train.parquet")
    ref = tok_tab.take(pa.array(chosen))
    for col in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"):
        if sub_tok.column(col).to_pylist() != ref.column(col).to_pylist():
            raise RuntimeError(f"re-tokenizing the selected rows changed column {col}")
    p = [len(x) for x in sub_tok.column("prompt_input_ids").to_pylist()]
    c = [len(x) for x in sub_tok.column("chosen_input_ids").to_pylist()]
    r = [len(x) for x in sub_tok.column("rejected_input_ids").to_pylist()]
    ref_lengths = [[pi + ci, pi + ri] for pi, ci, ri in zip(p, c, r)]

    def msgs(v):
        return [{"role": m["role"], "content": m["content"]} for m in v]

    trl_rows = [
        {"prompt": msgs(pr), "chosen": msgs(ch), "rejected": msgs(rj)}
        for pr, ch, rj in zip(
            sub.column("prompt").to_pylist(), sub.column("chosen").to_pylist(), sub.column("rejected").to_pylist()
        )
    ]
    spec = {
        "model_dir": str(model_dir),
        "model": args.model,
        "model_origin": origin,
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "peft": args.peft,
        "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "lora_target_modules": "all-linear",
        "data_path": str(bench / "data" / "train.parquet"),
        "tokenized_dir": str(bench / "tokenized"),
        "trl_rows": trl_rows,
        "ref_lengths": ref_lengths,
        "source_rows": chosen,
        "warmup": args.warmup,
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "beta": args.beta,
        "optim": args.optim,
        "seed": args.seed,
        "max_length": args.max_length,
        "max_prompt_length": args.max_prompt_length,
        "threads": args.threads,
        "matmul_n": args.matmul_n,
        "matmul_reps": args.matmul_reps,
        "heap": bool(args.heap),
        "eligible_pairs": len(eligible),
        "pairs_total": len(prompt_lens),
    }
    if args.chunk_size is not None:
        spec["chunk_size"] = args.chunk_size
    spec["device"] = args.device
    spec["precision"] = args.precision
    spec["bf16_weights"] = bool(getattr(args, "bf16_weights", False))
    return spec


def resize_vocab(model_dir: Path, vocab_size: int, seed: int = 0) -> None:
    """Give the benchmark model ``vocab_size`` embedding / lm-head rows (e.g. SmolLM3's 128,256).

    The tokenizer is unchanged (GPT-2 + ChatML, 50,260 ids), so the extra rows are never a
    target, but every logit row has ``vocab_size`` entries: that is what the lm-head and loss
    cost in time and memory. New rows are drawn from ``N(0, initializer_range)``.

    Raises:
        ValueError: ``vocab_size`` smaller than the tokenizer.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if vocab_size < len(tok):
        raise ValueError(f"--vocab-size {vocab_size} is smaller than the tokenizer ({len(tok)} ids)")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    model.save_pretrained(str(model_dir))

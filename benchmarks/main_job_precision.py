"""The main job in fp32 and in bf16, one after the other on this machine: wall time and result.

Runs ``orpo run recipes/smollm2-instructions.yaml`` twice, each into a fresh output folder
(``--set train.precision=fp32`` then ``=bf16``, or the order of ``--order``), with the same
installed environment, and prints for each: the whole command's wall time, the train stage's
``train_runtime`` and the evaluation's own timing (``eval.json``'s ``timing_s.total``), the
instruction-following result (prompt-level strict accuracy of the trained model on the held-out
instructions, with its 95 % bootstrap interval as ``eval.json`` reports it), and then the paired
difference bf16 - fp32 of the two trained models on the same prompts (95 % paired bootstrap
interval over prompts, ``--bootstrap`` resamples).

Before the timed runs the packaged GGUF is converted once (``orpo prep`` into a scratch folder):
that one-time conversion is cached and would otherwise be charged to the first run only.
The machine's load average is printed before and after each run: figures taken under load are
not comparable (with 2 threads each parallel op waits for a core).

    python benchmarks/main_job_precision.py --json main_job_precision.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "smollm2-instructions.yaml"


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _orpo(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def run_once(precision: str, out_dir: Path, recipe: Path) -> dict:
    """One ``orpo run`` into ``out_dir``; returns wall time, stage timings and the eval result.

    Raises:
        RuntimeError: the run failed (message ends with its output tail).
    """
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # its own temporary server
    load0 = _load()
    t0 = time.perf_counter()
    proc = subprocess.run(_orpo("run", str(recipe), "--set", f"output_dir={out_dir}", "--set", f"train.precision={precision}"),
                          cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"orpo run ({precision}) failed with exit {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    metrics = json.loads((out_dir / "train" / "metrics.json").read_text())
    ev = json.loads((out_dir / "eval" / "eval.json").read_text())
    res = ev["metrics"]["trained"]
    key = next(k for k in res if k.endswith("prompt_level_strict_acc"))
    return {
        "precision": precision,
        "precision_record": metrics.get("precision"),
        "wall_s": round(wall, 1),
        "train_runtime_s": round(float(metrics["train"]["train_runtime"]), 1),
        "eval_s": round(float(ev["timing_s"]["total"]), 1),
        "metric": key,
        "trained": res[key],
        "base": ev["metrics"].get("base", {}).get(key),
        "per_prompt": [all(p["follow"]) for p in ev["instructions"]["per_prompt"]["trained"]],
        "origins": [p["origin"] for p in ev["instructions"]["per_prompt"]["trained"]],
        "load_before": load0,
        "load_after": _load(),
    }


def paired_diff(a: list[bool], b: list[bool], n_boot: int, seed: int = 0) -> dict:
    """Mean of ``b - a`` over paired prompts with a 95 % percentile bootstrap interval (resampling prompts)."""
    n = len(a)
    d = [int(y) - int(x) for x, y in zip(a, b, strict=True)]
    rng = random.Random(seed)
    boots = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    return {"delta": sum(d) / n, "ci95": [boots[int(0.025 * n_boot)], boots[int(0.975 * n_boot) - 1]], "n": n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(RECIPE))
    ap.add_argument("--order", default="fp32,bf16", help="precisions in run order")
    ap.add_argument("--work-dir", default=None, help="output folders go here (default: a temporary folder, kept)")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="main_job_precision_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder {work}; load {_load()} on {os.cpu_count()} CPUs", flush=True)
    t0 = time.perf_counter()
    subprocess.run(_orpo("prep", args.recipe, "--set", f"output_dir={work / 'warm'}"), cwd=ROOT, check=True,
                   capture_output=True)
    print(f"model conversion / data warm-up: {time.perf_counter() - t0:.0f}s (not timed below)", flush=True)
    runs = {}
    for precision in args.order.split(","):
        r = run_once(precision, work / precision, Path(args.recipe))
        runs[precision] = r
        t = r["trained"]
        print(f"{precision}: wall {r['wall_s']:.0f}s (train {r['train_runtime_s']:.0f}s, evaluate {r['eval_s']:.0f}s), "
              f"{r['metric']} trained {t['value']:.3f} {t.get('ci95')}, load {r['load_before']} -> {r['load_after']}, "
              f"precision {json.dumps(r['precision_record'])}", flush=True)
    report = {"runs": {k: {kk: vv for kk, vv in v.items() if kk not in ("per_prompt", "origins")} for k, v in runs.items()}}
    if {"fp32", "bf16"} <= set(runs):
        a, b = runs["fp32"], runs["bf16"]
        if a["origins"] != b["origins"]:
            raise RuntimeError("the two runs scored different prompts")
        report["bf16_minus_fp32"] = paired_diff(a["per_prompt"], b["per_prompt"], args.bootstrap)
        report["wall_ratio_bf16_over_fp32"] = round(b["wall_s"] / a["wall_s"], 3)
        report["train_ratio_bf16_over_fp32"] = round(b["train_runtime_s"] / a["train_runtime_s"], 3)
        report["eval_ratio_bf16_over_fp32"] = round(b["eval_s"] / a["eval_s"], 3)
        d = report["bf16_minus_fp32"]
        print(f"bf16 - fp32 (trained, paired over {d['n']} prompts): {d['delta']:+.3f} {d['ci95']}; "
              f"wall bf16/fp32 {report['wall_ratio_bf16_over_fp32']}, train {report['train_ratio_bf16_over_fp32']}, "
              f"evaluate {report['eval_ratio_bf16_over_fp32']}")
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

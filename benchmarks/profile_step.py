"""Where one training step of our trainer spends its time: GEMM share, GEMM rate, and the GEMM-bound floor.

Runs our trainer on the inputs of a kept ``bench_train.py`` run (same model, rows and settings:
sequential batches of 2 pairs, fp32 or ``--precision bf16`` autocast, sdpa) and profiles one optimizer step with
``torch.profiler`` (``with_flops``). Prints the ops by self CPU time and a summary:

* ``gemm_s``: self time of ``aten::mm`` / ``addmm`` / ``addmm_`` / ``bmm`` in the step;
* ``gemm_gflops``: their FLOPs (``2mkn`` each, as counted by the profiler) / ``gemm_s``;
* ``floor_s``: the same FLOPs at the fp32 (bf16 with ``--precision bf16``) matmul rate of ``bench_train.py``'s probe
  (``matmul_peak_flops``, measured here first): the step's time if it were nothing but GEMMs
  running at that rate.

Usage::

    python benchmarks/bench_train.py --variants ours --reps 1 --warmup 1 --steps 1 --keep --work-dir /tmp/bt
    python benchmarks/profile_step.py /tmp/bt [--step 3] [--gradient-checkpointing] [--optim adamw_torch]

The profiled step is slower than an unprofiled one (the profiler's own overhead, about 5-10 %).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

GEMMS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("work_dir", help="scratch folder of `bench_train.py --keep` (holds spec.json)")
    p.add_argument("--step", type=int, default=3, help="optimizer step to profile (1-based; the run trains this many steps)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--optim", default="adamw_torch_fused")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: bf16 autocast over float32 weights (train.precision: bf16); the probe runs in bf16 too")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=30, help="rows of the op table")
    p.add_argument("--shapes", action="store_true", help="also a table grouped by op and input shapes")
    a = p.parse_args(argv)

    import torch
    import transformers
    from torch.utils.data import SequentialSampler

    import orpo_core.training.trainer as ot
    from orpo_core.config import recipe_from_dict
    from orpo_core.training.run import run_training

    torch.set_num_threads(a.threads)
    spec = json.loads((Path(a.work_dir) / "spec.json").read_text())
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from trainbench.flops import matmul_peak_flops

    matmul = matmul_peak_flops(n=spec.get("matmul_n", 2048), reps=spec.get("matmul_reps", 7),
                               dtype_name="bfloat16" if a.precision == "bf16" else "float32")["flops"] / 1e9
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True, record_shapes=a.shapes)
    times: dict[str, float] = {}

    class Sequential(ot.ORPOTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    class Profile(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == a.step - 1:
                prof.start()
                times["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == a.step:
                times["step_s"] = time.perf_counter() - times["t0"]
                prof.stop()

    ot.ORPOTrainer = Sequential  # run_training looks it up at call time
    with tempfile.TemporaryDirectory(prefix="profile_step_") as tmp:
        recipe = recipe_from_dict({
            "run_name": "profile", "output_dir": tmp, "seed": spec.get("seed", 42),
            "model": {"name_or_path": spec["model_dir"], "dtype": "float32", "attn_implementation": "sdpa"},
            "data": {"sources": [{"path": spec["data_path"]}], "test_size": 0.0,
                     "max_length": spec["max_length"], "max_prompt_length": spec["max_prompt_length"]},
            "orpo": {"beta": spec["beta"]},
            "train": {"learning_rate": spec["lr"], "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
                      "optim": a.optim, "max_steps": a.step, "per_device_train_batch_size": spec["batch"],
                      "gradient_checkpointing": a.gradient_checkpointing, "logging_steps": a.step,
                      "precision": a.precision,
                      "eval_steps": None, "save_steps": None, "disable_dropout": True, "group_by_length": False,
                      "report_to": []},
            "eval": {"bootstrap_samples": 0}}, where="<profile_step>")
        run_training(recipe, spec["tokenized_dir"], Path(tmp) / "train", resume=False, callbacks=[Profile()])

    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=a.rows))
    if a.shapes:
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=a.rows,
                                                                  max_name_column_width=40, max_shapes_column_width=70))
    total_s = sum(e.self_cpu_time_total for e in events) / 1e6
    gemm = [e for e in events if e.key in GEMMS]
    gemm_s = sum(e.self_cpu_time_total for e in gemm) / 1e6
    gemm_flops = sum(e.flops for e in gemm)
    out = {
        "step": a.step,
        "step_s_profiled": times.get("step_s"),
        "self_cpu_s": total_s,
        "gemm_s": gemm_s,
        "gemm_share": gemm_s / total_s if total_s else None,
        "gemm_gflop": gemm_flops / 1e9,
        "gemm_gflops": gemm_flops / 1e9 / gemm_s if gemm_s else None,
        "matmul_gflops_probe": matmul,
        "floor_s": gemm_flops / 1e9 / matmul if matmul else None,
        "optim": a.optim,
        "precision": a.precision,
        "gradient_checkpointing": a.gradient_checkpointing,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-run figures (tokens/s, MFU, memory above the training state), the summary over reps, the table."""

from __future__ import annotations

import statistics
from typing import Any

from trainbench import TARGETS
from trainbench.flops import row_flops

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

"""Peak memory and time of the unfused vs chunked fused ORPO loss (forward + backward), CPU.

Each variant runs in a fresh subprocess; the peak-RSS delta is ``ru_maxrss`` after one
forward+backward minus ``ru_maxrss`` once the inputs exist (torch allocates with the
system allocator on CPU, so tracemalloc cannot see it). Timing is the median over
``--repeats`` further forward+backward passes.

    python benchmarks/bench_fused_loss.py                    # V=50257, T=512, B=2, H=256, fp32
    python benchmarks/bench_fused_loss.py --frozen-head      # LoRA-like: no lm-head gradient
    python benchmarks/bench_fused_loss.py --chunks 256 1024 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def _maxrss_mib() -> float:
    # Linux: KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    from orpo_core.training.fused import orpo_loss_from_hidden
    from orpo_core.training.loss import orpo_loss_from_logits

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    rows, T, H, V = 2 * args.batch, args.seq_len, args.hidden, args.vocab
    hidden = torch.randn(rows, T, H).requires_grad_(True)
    weight = (torch.randn(V, H) * H**-0.5).requires_grad_(not args.frozen_head)
    ids = torch.randint(0, V, (rows, T))
    attn = torch.ones(rows, T, dtype=torch.long)
    comp = torch.zeros(rows, T, dtype=torch.long)
    prompt = T // 4
    for r in range(rows):
        pad = (r * 37) % (T // 8)  # a little right padding, different per row
        if pad:
            attn[r, T - pad:] = 0
        comp[r, prompt:T - pad] = 1

    def step():
        hidden.grad = None
        weight.grad = None
        if args.variant == "unfused":
            logits = F.linear(hidden, weight)
            out = orpo_loss_from_logits(logits, ids, attn, comp, beta=0.1)
        else:
            out = orpo_loss_from_hidden(hidden, weight, None, ids, attn, comp, beta=0.1, chunk_size=args.chunk)
        out.loss.backward()
        return out.loss.item()

    base = _maxrss_mib()
    t0 = time.perf_counter()
    loss = step()
    first = time.perf_counter() - t0
    peak = _maxrss_mib()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {
        "variant": args.variant if args.variant == "unfused" else f"fused(chunk={args.chunk})",
        "loss": loss,
        "peak_rss_delta_mib": round(peak - base, 1),
        "first_s": round(first, 3),
        "median_s": round(statistics.median(times), 3) if times else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=2, help="pairs (rows = 2 * batch)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--chunks", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--frozen-head", action="store_true", help="lm-head weight without grad (LoRA)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="unfused", help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=1024, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    rows = 2 * args.batch
    logits_mib = rows * args.seq_len * args.vocab * 4 / 2**20
    print(
        f"V={args.vocab} T={args.seq_len} B={args.batch} pairs ({rows} rows) H={args.hidden} fp32, "
        f"lm-head {'frozen' if args.frozen_head else 'trainable'}; one [2B, T, V] fp32 tensor = {logits_mib:.0f} MiB"
    )
    common = [
        "--vocab", str(args.vocab), "--seq-len", str(args.seq_len), "--batch", str(args.batch),
        "--hidden", str(args.hidden), "--repeats", str(args.repeats), "--threads", str(args.threads),
    ] + (["--frozen-head"] if args.frozen_head else [])
    variants = [["--variant", "unfused"]] + [["--variant", "fused", "--chunk", str(c)] for c in args.chunks]
    results = []
    for v in variants:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", *common, *v], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            raise SystemExit(f"variant {v} failed (exit {proc.returncode})")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{'variant':<20} {'loss':>10} {'peak RSS delta MiB':>19} {'first s':>8} {'median s':>9}")
    for r in results:
        print(
            f"{r['variant']:<20} {r['loss']:>10.5f} {r['peak_rss_delta_mib']:>19.1f} {r['first_s']:>8.3f} "
            f"{r['median_s'] if r['median_s'] is not None else float('nan'):>9.3f}"
        )


if __name__ == "__main__":
    main()

"""FLOPs: the matmul-rate probe, training FLOPs per row, the model's shape."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

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

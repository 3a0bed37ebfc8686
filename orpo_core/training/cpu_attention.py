"""Attention of one packed segment on CPU in bf16/fp16: grouped GEMMs, fp32 softmax, own backward.

:func:`orpo_core.training.packing.segment_sdpa_attention_forward` runs attention once per
:class:`~orpo_core.training.packing.AttentionSegment` of a packed row. On a CPU in bf16 autocast
``torch.nn.functional.scaled_dot_product_attention`` takes its CPU flash kernel, whose backward
is slow on the short, single-row segments of ORPO pairs: measured on a 2-core AMD EPYC with
``avx512_bf16`` (torch 2.13, 2 threads, 9 query / 3 key-value heads of 64, causal 512 x 512) the
sdpa forward takes 4.8 ms and its backward 11.9 ms; this kernel 5.5 ms and 5.3 ms
(figures and the whole-step effect in docs/training.md, "bf16 on CPU").

The kernel is the textbook computation (Vaswani et al. 2017, eq. 1; the backward of softmax
attention as in FlashAttention, Dao et al. 2022, Algorithm 4, without tiling):

* forward: ``S = Q K^T`` (one ``bmm`` per key-value head, the ``g = Hq / Hkv`` query heads
  sharing it stacked along the rows: no ``repeat_kv`` copy of K and V),
  ``P = softmax(scale * S + bias)`` in float32, ``O = P V`` with ``P`` rounded to the input dtype;
* backward: ``dV = P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - rowsum(dP * P))`` (softmax's
  backward, ``torch._softmax_backward_data``, float32 inside), ``dQ = scale * dS K``,
  ``dK = scale * dS^T Q``, the GEMMs in the input dtype.

Numerics: ``S`` and ``dP`` leave their GEMMs rounded to bf16 (fp32 accumulation inside the GEMM),
and ``P`` / ``dS`` are stored in bf16, exactly as transformers' ``eager`` attention computes
under autocast (``matmul`` in bf16, ``softmax(..., dtype=float32).to(bf16)``); the CPU flash
kernel keeps ``S`` and ``dP`` in float32. Against a float64 reference on the same bf16 inputs the maximum
relative error of the output and gradients is up to 1.6e-2 here and 9e-3 for sdpa
(tests/test_cpu_attention.py bounds the kernel's); a 40-step bf16 training run stays within the fp32 tolerance of
tests/test_precision.py. Float32 inputs never take this path (sdpa is faster there).

Memory: ``P`` is saved for the backward, ``Hq * Lq * Lk`` values of the input dtype per segment and
layer (a 512-token row with 9 heads: 4.7 MB); segments with more than
:data:`MAX_SCORES_PER_HEAD` query-key entries per head use sdpa instead.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "MAX_SCORES_PER_HEAD", "use_cpu_segment_kernel", "lower_right_causal", "segment_attention_bias",
    "grouped_segment_attention",
]

#: largest ``Lq * Lk`` per head the kernel takes (1024 x 1024); larger segments use sdpa, whose
#: memory does not grow with ``Lq * Lk``
MAX_SCORES_PER_HEAD = 1024 * 1024


def use_cpu_segment_kernel(query: torch.Tensor, lq: int, lk: int, dropout: float) -> bool:
    """Whether a segment's attention takes :func:`grouped_segment_attention`: CPU tensors in
    bf16/fp16 (after autocast's cast), no dropout, ``lq * lk <= MAX_SCORES_PER_HEAD``."""
    return (
        query.device.type == "cpu"
        and query.dtype in (torch.bfloat16, torch.float16)
        and not dropout
        and lq * lk <= MAX_SCORES_PER_HEAD
    )


def lower_right_causal(lq: int, lk: int, device=None) -> torch.Tensor:
    """``[lq, lk]`` bool causal mask with lower-right alignment: key ``j`` visible to query ``i``
    iff ``j <= i + lk - lq`` (the last query sees every key)."""
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None]
    return j <= i + (lk - lq)


def segment_attention_bias(mask: torch.Tensor | None, lq: int, lk: int, groups: int) -> torch.Tensor:
    """The additive float32 bias ``[groups * lq, lk]`` of a segment: 0 where query ``i`` may see
    key ``j``, ``-inf`` elsewhere, repeated for the ``groups`` query heads stacked per key-value head.

    Args:
        mask: ``[lq, lk]`` bool (True = attend), or None for causal attention with lower-right
            alignment (key ``j`` visible to query ``i`` iff ``j <= i + lk - lq``).

    Raises:
        ValueError: ``mask`` has another shape, or a query row sees no key (its softmax would be NaN).
    """
    if mask is None:
        mask = lower_right_causal(lq, lk)
    if tuple(mask.shape) != (lq, lk):
        raise ValueError(f"segment attention mask has shape {tuple(mask.shape)}, expected ({lq}, {lk})")
    if not bool(mask.any(1).all()):
        raise ValueError("segment attention mask: a query row sees no key")
    bias = torch.zeros(lq, lk, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
    return bias.repeat(groups, 1) if groups > 1 else bias


class _GroupedAttention(torch.autograd.Function):
    """``q [Hkv, g*Lq, D]``, ``k, v [Hkv, Lk, D]`` (same low-precision dtype), ``bias [g*Lq, Lk]``
    float32 -> ``o [Hkv, g*Lq, D]``; see the module docstring for the formulas."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        s = torch.bmm(q, k.transpose(1, 2)).float()
        s = torch.add(bias, s, alpha=scale)
        p = torch.softmax(s, -1).to(q.dtype)
        del s
        o = torch.bmm(p, v)
        ctx.save_for_backward(q, k, v, p)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, grad_o):
        q, k, v, p = ctx.saved_tensors
        grad_o = grad_o.contiguous()
        grad_v = torch.bmm(p.transpose(1, 2), grad_o)
        dp = torch.bmm(grad_o, v.transpose(1, 2))
        # softmax's backward P * (dP - rowsum(dP * P)), float32 inside the kernel; the scale of
        # S = scale * Q K^T goes onto the two small gradients instead of the [g*Lq, Lk] tensor
        ds = torch._softmax_backward_data(dp, p, -1, p.dtype)
        del dp
        grad_q = torch.bmm(ds, k).mul_(ctx.scale)
        grad_k = torch.bmm(ds.transpose(1, 2), q).mul_(ctx.scale)
        return grad_q, grad_k, grad_v, None, None


def grouped_segment_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Attention of one segment with grouped-query heads, differentiable in all three inputs.

    Args:
        query: ``[1, Hq, Lq, D]`` bf16/fp16; key, value: ``[1, Hkv, Lk, D]`` same dtype,
            ``Hq`` a multiple of ``Hkv`` (query head ``h`` uses key-value head ``h // (Hq / Hkv)``,
            transformers' ``repeat_kv`` convention).
        bias: ``[g * Lq, Lk]`` float32 from :func:`segment_attention_bias` with ``g = Hq / Hkv``.
        scale: softmax scale, default ``1 / sqrt(D)``.

    Returns:
        ``[1, Hq, Lq, D]`` in the input dtype.

    Raises:
        ValueError: batch other than 1, ``Hq`` not a multiple of ``Hkv``, or ``bias`` of another shape.
    """
    if query.shape[0] != 1 or key.shape[0] != 1:
        raise ValueError(f"grouped segment attention takes one row, got batches {query.shape[0]} and {key.shape[0]}")
    _, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} key-value heads")
    g = hq // hkv
    if tuple(bias.shape) != (g * lq, lk):
        raise ValueError(f"attention bias has shape {tuple(bias.shape)}, expected ({g * lq}, {lk})")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q = query[0].reshape(hkv, g * lq, d)
    out = _GroupedAttention.apply(q, key[0], value[0], bias, scale)
    return out.reshape(1, hq, lq, d)

"""The CPU bf16 segment-attention kernel (orpo_core/training/cpu_attention.py).

* forward and all three gradients against a float64 reference on the same bf16 inputs, for a
  causal row and a lower-right masked (prompt-sharing) segment with grouped-query heads, with
  sdpa's own bf16 error on the same inputs as the yardstick;
* the segment attention of a packed batch takes the kernel in bf16 on CPU (and only there)
  and agrees with per-segment sdpa;
* the bias / shape checks raise clear errors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from orpo_core.training import cpu_attention
from orpo_core.training.cpu_attention import (
    MAX_SCORES_PER_HEAD,
    grouped_segment_attention,
    segment_attention_bias,
    use_cpu_segment_kernel,
)
from orpo_core.training.packing import SEGMENTS_KWARG, build_packed_batch, segment_sdpa_attention_forward

#: max relative error (max |err| / max |ref|) of the kernel's output and gradients against float64
#: on bf16 inputs. Measured: 5e-3 .. 1.6e-2 (S and dP are rounded to bf16 as in eager attention);
#: sdpa's flash kernel on the same inputs: 2e-3 .. 9e-3.
KERNEL_RTOL = 3e-2


def _qkv(lq, lk, hq=6, hkv=2, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(1, hq, lq, d, generator=g)).bfloat16().requires_grad_()
    k = (2 * torch.randn(1, hkv, lk, d, generator=g)).bfloat16().requires_grad_()
    v = torch.randn(1, hkv, lk, d, generator=g).bfloat16().requires_grad_()
    go = torch.randn(1, hq, lq, d, generator=g).bfloat16()
    return q, k, v, go


def _sdpa(q, k, v, mask):
    n = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n, 1), v.repeat_interleave(n, 1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _grads(fn, q, k, v, go, mask):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v, mask)
    o.backward(go.to(o.dtype))
    return [o.detach().double(), q.grad.double(), k.grad.double(), v.grad.double()]


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("lq,lk", [(64, 64), (40, 72), (1, 9)])
def test_kernel_matches_float64_like_sdpa(lq, lk):
    q, k, v, go = _qkv(lq, lk)
    mask = None if lq == lk else torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
    groups = q.shape[1] // k.shape[1]
    bias = segment_attention_bias(mask, lq, lk, groups)
    ref = _grads(_sdpa, q.double(), k.double(), v.double(), go.double(), mask)
    ours = _grads(lambda a, b, c, m: grouped_segment_attention(a, b, c, bias), q, k, v, go, mask)
    sdpa = _grads(_sdpa, q, k, v, go, mask)
    for name, o, s, r in zip(("out", "dq", "dk", "dv"), ours, sdpa, ref):
        assert o.dtype == torch.float64 and o.shape == r.shape
        err = _rel(o, r)
        assert err <= KERNEL_RTOL, (name, err, _rel(s, r))
    # the kernel really ran in bf16 (a float32 path would be 1e-6 off)
    assert _rel(ours[0], ref[0]) > 1e-4


def test_gradients_flow_to_the_right_kv_head():
    """Query head h uses key-value head h // (Hq / Hkv) (transformers' repeat_kv convention):
    a loss on the heads of group 0 only gives key-value head 1 no gradient."""
    q, k, v, _ = _qkv(16, 16, hq=4, hkv=2)
    bias = segment_attention_bias(None, 16, 16, 2)
    o = grouped_segment_attention(q, k, v, bias)
    o[:, :2].float().sum().backward()
    assert k.grad[0, 1].abs().max() == 0 and v.grad[0, 1].abs().max() == 0
    assert k.grad[0, 0].abs().max() > 0 and v.grad[0, 0].abs().max() > 0


def test_packed_segments_take_the_kernel_in_bf16_and_agree_with_sdpa(monkeypatch):
    torch.manual_seed(0)
    # two pairs, prompt sharing: (prompt, chosen), (prompt, rejected) rows
    rows = [(7, 12), (5, 9), (7, 4), (5, 11)]
    width = max(p + c for p, c in rows)
    ids = torch.zeros(4, width, dtype=torch.long)
    attn = torch.zeros_like(ids)
    comp = torch.zeros_like(ids)
    for r, (p, c) in enumerate(rows):
        ids[r, : p + c] = torch.randint(1, 50, (p + c,))
        if r >= 2:
            ids[r, :p] = ids[r - 2, :p]
        attn[r, : p + c] = 1
        comp[r, p : p + c] = 1
    pk = build_packed_batch(ids, attn, comp, share_prompts=True)
    n = pk.num_tokens
    q, k, v, _ = _qkv(n, n, hq=6, hkv=2, d=16)
    calls = []
    real = cpu_attention.grouped_segment_attention
    monkeypatch.setattr("orpo_core.training.packing.grouped_segment_attention",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    out, _ = segment_sdpa_attention_forward(torch.nn.Module(), q, k, v, None, **{SEGMENTS_KWARG: pk.segments})
    assert len(calls) == len(pk.segments)  # every segment took the kernel
    monkeypatch.setattr(cpu_attention, "MAX_SCORES_PER_HEAD", 0)  # every segment "too large": sdpa
    calls.clear()
    ref, _ = segment_sdpa_attention_forward(torch.nn.Module(), q, k, v, None, **{SEGMENTS_KWARG: pk.segments})
    assert not calls  # all on sdpa now
    exact, _ = segment_sdpa_attention_forward(
        torch.nn.Module(), q.double(), k.double(), v.double(), None, **{SEGMENTS_KWARG: pk.segments})
    assert out.shape == ref.shape == (1, n, 6, 16)
    assert _rel(out.double(), exact) <= KERNEL_RTOL and _rel(ref.double(), exact) <= KERNEL_RTOL


def test_kernel_choice():
    bf = torch.zeros(1, 2, 4, 8, dtype=torch.bfloat16)
    assert use_cpu_segment_kernel(bf, 4, 4, 0.0)
    assert use_cpu_segment_kernel(bf.half(), 4, 4, 0.0)
    assert not use_cpu_segment_kernel(bf.float(), 4, 4, 0.0)  # fp32: sdpa is faster
    assert not use_cpu_segment_kernel(bf, 4, 4, 0.1)  # dropout: sdpa
    assert not use_cpu_segment_kernel(bf, MAX_SCORES_PER_HEAD, 2, 0.0)  # P would be too large


def test_bias_and_shape_errors():
    b = segment_attention_bias(None, 2, 4, 3)
    assert b.shape == (6, 4) and b.dtype == torch.float32
    assert b[0].tolist() == [0, 0, 0, float("-inf")] and b[2].tolist() == b[0].tolist()  # repeated per group
    with pytest.raises(ValueError, match="shape"):
        segment_attention_bias(torch.ones(3, 3, dtype=torch.bool), 2, 3, 1)
    with pytest.raises(ValueError, match="sees no key"):
        segment_attention_bias(torch.tensor([[True, False], [False, False]]), 2, 2, 1)
    q, k, v, _ = _qkv(4, 4, hq=3, hkv=2)
    with pytest.raises(ValueError, match="multiple"):
        grouped_segment_attention(q, k, v, torch.zeros(4, 4))
    q, k, v, _ = _qkv(4, 4)
    with pytest.raises(ValueError, match="bias has shape"):
        grouped_segment_attention(q, k, v, torch.zeros(4, 4))

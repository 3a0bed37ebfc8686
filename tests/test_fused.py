"""Chunked fused lm-head + ORPO loss: equal to the unfused loss (values and gradients), no [N, V] tensor."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import orpo_core.training.fused as fused_mod
from orpo_core.training.fused import (
    _LMHeadTargetLogps,
    _pair_groups,
    lm_head_transform_from_config,
    orpo_loss_from_hidden,
    per_token_logps_from_hidden,
)
from orpo_core.training.loss import nll_token_count, orpo_loss_from_logits, orpo_target_masks


def make_inputs(B=2, T=11, H=8, V=37, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=g, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g, dtype=dtype) * 0.5).requires_grad_(True)
    b = (torch.randn(V, generator=g, dtype=dtype) * 0.1).requires_grad_(True) if bias else None
    ids = torch.randint(1, V, (2 * B, T), generator=g)
    attn = torch.ones(2 * B, T, dtype=torch.long)
    comp = torch.zeros(2 * B, T, dtype=torch.long)
    prompt = [3, 5, 2, 4, 3, 6][: 2 * B]
    pad = [0, 2, 1, 3, 0, 1][: 2 * B]
    for r in range(2 * B):
        if pad[r]:
            attn[r, T - pad[r]:] = 0
            ids[r, T - pad[r]:] = 0
        comp[r, prompt[r]:T - pad[r]] = 1
    return hidden, weight, b, ids, attn, comp


def reference(hidden, weight, bias, ids, attn, comp, scale=None, softcap=None, **kw):
    logits = F.linear(hidden, weight, bias).float()
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return orpo_loss_from_logits(logits, ids, attn, comp, **kw)


def grads(out, params):
    params = [p for p in params if p is not None]
    return torch.autograd.grad(out.loss, params)


def assert_rel_close(a, b, rel=1e-5):
    scale = max(b.abs().max().item(), 1e-6)
    assert (a - b).abs().max().item() <= rel * scale, ((a - b).abs().max().item(), scale)


CASES = [
    dict(beta=0.1),
    dict(beta=0.1, nll_on_prompt=False),
    dict(beta=0.5, alpha=0.0),
    dict(beta=0.0, alpha=1.0),
    dict(beta=0.0, alpha=1.0, nll_on_prompt=False),
    dict(beta=0.2, alpha=0.5, nll_denominator=17, pair_denominator=5),
]


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 24, 4096])
@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_fused_equals_unfused(chunk_size, kw):
    hidden, weight, bias, ids, attn, comp = make_inputs(bias=chunk_size != 16)
    params = [hidden, weight, bias]
    ref = reference(hidden, weight, bias, ids, attn, comp, **kw)
    out = orpo_loss_from_hidden(hidden, weight, bias, ids, attn, comp, chunk_size=chunk_size, **kw)
    assert_rel_close(out.loss.detach(), ref.loss.detach())
    for a, b in zip(grads(out, params), grads(ref, params)):
        assert_rel_close(a, b)
    assert torch.allclose(out.chosen_logps, ref.chosen_logps, rtol=1e-5)
    assert torch.allclose(out.rejected_logps, ref.rejected_logps, rtol=1e-5)
    for key, value in ref.metrics.items():
        assert out.metrics[key].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6), key


def test_fused_gradient_accumulation_with_denominators():
    B = 2
    hidden, weight, bias, ids, attn, comp = make_inputs(B=B, seed=3)
    full = orpo_loss_from_hidden(hidden, weight, bias, ids, attn, comp, beta=0.2, chunk_size=5)
    full_g = torch.autograd.grad(full.loss, [hidden, weight, bias])
    n_nll = nll_token_count(attn, comp)
    total_loss = 0.0
    acc = [torch.zeros_like(hidden), torch.zeros_like(weight), torch.zeros_like(bias)]
    for i in range(B):
        rows = [i, i + B]
        h = hidden[rows]
        out = orpo_loss_from_hidden(h, weight, bias, ids[rows], attn[rows], comp[rows], beta=0.2, chunk_size=5,
                                    nll_denominator=n_nll, pair_denominator=B)
        g = torch.autograd.grad(out.loss, [hidden, weight, bias])
        total_loss += out.loss.item()
        acc = [a + b for a, b in zip(acc, g)]
    assert total_loss == pytest.approx(full.loss.item(), rel=1e-6)
    for a, b in zip(acc, full_g):
        assert_rel_close(a, b)


@pytest.mark.parametrize("scale, softcap", [(None, 3.0), (0.5, None), (2.0, 1.5)])
def test_logit_scale_and_softcap(scale, softcap):
    hidden, weight, bias, ids, attn, comp = make_inputs(seed=4)
    params = [hidden, weight, bias]
    ref = reference(hidden, weight, bias, ids, attn, comp, scale=scale, softcap=softcap, beta=0.3)
    out = orpo_loss_from_hidden(hidden, weight, bias, ids, attn, comp, beta=0.3, chunk_size=6,
                                logit_scale=scale, softcap=softcap)
    assert_rel_close(out.loss.detach(), ref.loss.detach())
    for a, b in zip(grads(out, params), grads(ref, params)):
        assert_rel_close(a, b)
    assert out.metrics["logits/chosen"].item() == pytest.approx(ref.metrics["logits/chosen"].item(), rel=1e-5)


def test_autograd_function_gradcheck_float64():
    g = torch.Generator().manual_seed(5)
    h = torch.randn(9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 6, (9,), generator=g)
    for scale, cap in ((None, None), (1.5, 2.0)):
        assert torch.autograd.gradcheck(lambda h, w, b: _LMHeadTargetLogps.apply(h, w, b, t, 4, scale, cap)[0],
                                        (h, w, b))


def test_frozen_lm_head_gets_no_gradient():
    hidden, weight, bias, ids, attn, comp = make_inputs(bias=False, seed=6)
    frozen = weight.detach()
    ref = reference(hidden, frozen, None, ids, attn, comp, beta=0.1)
    out = orpo_loss_from_hidden(hidden, frozen, None, ids, attn, comp, beta=0.1, chunk_size=8)
    out.loss.backward()
    assert frozen.grad is None
    (g_ref,) = torch.autograd.grad(ref.loss, [hidden])
    assert_rel_close(hidden.grad, g_ref)


def test_low_precision_weights_track_fp32_reference():
    hidden, weight, bias, ids, attn, comp = make_inputs(seed=7, bias=False)
    ref = reference(hidden, weight, None, ids, attn, comp, beta=0.1)
    (ref_gh,) = torch.autograd.grad(ref.loss, [hidden])
    for dtype in (torch.bfloat16, torch.float16):
        h = hidden.detach().to(dtype).requires_grad_(True)
        w = weight.detach().to(dtype).requires_grad_(True)
        out = orpo_loss_from_hidden(h, w, None, ids, attn, comp, beta=0.1, chunk_size=6)
        out.loss.backward()
        assert out.loss.dtype == torch.float32
        assert h.grad.dtype == dtype and w.grad.dtype == dtype
        assert out.loss.item() == pytest.approx(ref.loss.item(), rel=2e-2)
        assert torch.allclose(h.grad.float(), ref_gh, atol=5e-2 * ref_gh.abs().max().item())


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor produced by any op (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.max_numel = max(self.max_numel, o.numel())
        return out


def test_no_tensor_larger_than_a_chunk_of_logits():
    B, T, H, V, chunk = 2, 64, 4, 1000, 16
    hidden, weight, bias, ids, attn, comp = make_inputs(B=B, T=T, H=H, V=V, bias=False, seed=8)
    n_targets = int((attn[:, 1:]).sum())
    assert n_targets > 4 * chunk
    with _MaxNumel() as mode:
        out = orpo_loss_from_hidden(hidden, weight.detach(), None, ids, attn, comp, beta=0.1, chunk_size=chunk)
        out.loss.backward()
    assert mode.max_numel <= chunk * V, mode.max_numel
    with _MaxNumel() as mode:  # the unfused reference does materialise [2B, T, V]
        reference(hidden, weight.detach(), None, ids, attn, comp, beta=0.1).loss.backward()
    assert mode.max_numel >= 2 * B * T * V


def test_per_token_logps_from_hidden():
    hidden, weight, bias, ids, attn, comp = make_inputs(seed=9)
    h, tgt, mask = hidden[:, :-1], ids[:, 1:], comp[:, 1:].bool()
    got = per_token_logps_from_hidden(h, weight, bias, tgt, mask, chunk_size=5)
    ref = F.linear(h, weight, bias).log_softmax(-1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)[mask]
    assert got.shape == (int(mask.sum()),)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)
    (g_got,) = torch.autograd.grad(got.sum(), [weight])
    (g_ref,) = torch.autograd.grad(ref.sum(), [weight])
    assert_rel_close(g_got, g_ref)
    with pytest.raises(ValueError, match="targets"):
        per_token_logps_from_hidden(h, weight, bias, tgt[:, :-1], mask, chunk_size=5)


def test_bad_arguments_raise():
    hidden, weight, bias, ids, attn, comp = make_inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        orpo_loss_from_hidden(hidden, weight, bias, ids, attn, comp, beta=0.1, chunk_size=0)
    with pytest.raises(ValueError, match=r"\[V, H\]"):
        orpo_loss_from_hidden(hidden, weight[:, :3], bias, ids, attn, comp, beta=0.1, chunk_size=4)
    with pytest.raises(ValueError, match="hidden"):
        orpo_loss_from_hidden(hidden[:, :-1], weight, bias, ids, attn, comp, beta=0.1, chunk_size=4)


def test_lm_head_transform_from_config():
    assert lm_head_transform_from_config(SimpleNamespace()) == (None, None)
    assert lm_head_transform_from_config(SimpleNamespace(final_logit_softcapping=30.0)) == (None, 30.0)
    assert lm_head_transform_from_config(SimpleNamespace(logit_scale=0.0625)) == (0.0625, None)
    nested = SimpleNamespace(text_config=SimpleNamespace(final_logit_softcapping=None, logit_scale=None))
    assert lm_head_transform_from_config(nested) == (None, None)
    with pytest.raises(NotImplementedError, match="logits_scaling"):
        lm_head_transform_from_config(SimpleNamespace(logits_scaling=8.0))


@pytest.mark.parametrize("chunk_size", [8, 64])  # recomputing backward / one-pass
def test_autocast_does_not_change_the_projection_dtype(chunk_size):
    # under CPU bf16 autocast the projection and the gradient matmuls still run in the fp32
    # weight dtype, so both paths match the fp32 reference
    hidden, weight, bias, ids, attn, comp = make_inputs(seed=10)
    params = [hidden, weight, bias]
    ref = reference(hidden, weight, bias, ids, attn, comp, beta=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = orpo_loss_from_hidden(hidden, weight, bias, ids, attn, comp, beta=0.1, chunk_size=chunk_size)
    assert_rel_close(out.loss.detach(), ref.loss.detach())
    for a, b in zip(grads(out, params), grads(ref, params)):
        assert_rel_close(a, b)


# --------------------------------------------------------------------------- one-pass path
class _CountOnePass:
    """Counts calls of the one-pass autograd Function (which path a loss call took)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = fused_mod._OnePassORPO.apply

        def spy(*args):
            self.calls += 1
            return real(*args)

        monkeypatch.setattr(fused_mod._OnePassORPO, "apply", spy)


def test_pair_groups_pack_whole_pairs():
    pair = torch.tensor([0] * 5 + [1] * 3 + [2] * 4 + [3] * 6)
    assert _pair_groups(pair, 4, 8) == [(0, 8, [0, 1]), (8, 12, [2]), (12, 18, [3])]
    assert _pair_groups(pair, 4, 100) == [(0, 18, [0, 1, 2, 3])]
    # pairs without tokens (left to the recomputing path) are not in any group
    assert _pair_groups(torch.tensor([0, 0, 2, 2, 2]), 3, 5) == [(0, 5, [0, 2])]
    with pytest.raises(ValueError, match="6 target tokens"):
        _pair_groups(pair, 4, 5)


@pytest.mark.parametrize("kw", CASES + [dict(beta=0.3, logit_scale=0.5)],
                         ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_one_pass_equals_recomputing_backward(monkeypatch, kw):
    """Same loss and gradients with the gradient taken in forward (several pair groups) as
    with the recomputing backward; the one-pass Function really ran."""
    hidden, weight, bias, ids, attn, comp = make_inputs(B=3, T=13, seed=11)
    params = [hidden, weight, bias]
    counter = _CountOnePass(monkeypatch)
    two = orpo_loss_from_hidden(hidden, weight, bias, ids, attn, comp, chunk_size=24, one_pass=False, **kw)
    g_two = grads(two, params)
    assert counter.calls == 0
    one = orpo_loss_from_hidden(hidden, weight, bias, ids, attn, comp, chunk_size=24, **kw)
    assert counter.calls == 1
    assert_rel_close(one.loss.detach(), two.loss.detach())
    for a, b in zip(grads(one, params), g_two):
        assert_rel_close(a, b)
    for key, value in two.metrics.items():
        assert one.metrics[key].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6), key
    # a chunk smaller than every pair's tokens: all through the recomputing backward
    orpo_loss_from_hidden(hidden, weight, bias, ids, attn, comp, chunk_size=5, **kw)
    assert counter.calls == 1


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_mixed_batch_long_pairs_recomputed(monkeypatch, kw):
    """Pairs over chunk_size go through the recomputing path, the others through the one-pass
    Function, in one call: loss, gradients and metrics equal the unfused reference."""
    hidden, weight, bias, ids, attn, comp = make_inputs(B=3, T=13, seed=11)
    for row, end in ((1, 7), (4, 6)):  # make pair 1 short in every case
        attn[row, end:] = 0
        comp[row, end:] = 0
        ids[row, end:] = 0
    params = [hidden, weight, bias]
    logp_mask, nll_mask = orpo_target_masks(ids, attn, comp, kw.get("nll_on_prompt", True))
    grad_mask = (logp_mask if kw["beta"] else torch.zeros_like(logp_mask)) | (nll_mask if kw.get("alpha", 1.0) else False)
    per_pair = [int(grad_mask[b].sum() + grad_mask[3 + b].sum()) for b in range(3)]
    chunk = min(per_pair)  # the shortest pair fits, the longest does not
    assert chunk < max(per_pair), per_pair
    counter = _CountOnePass(monkeypatch)
    recomputed = []
    real = fused_mod._LMHeadTargetLogps.apply
    monkeypatch.setattr(fused_mod._LMHeadTargetLogps, "apply", lambda *a: recomputed.append(a[0].shape[0]) or real(*a))
    out = orpo_loss_from_hidden(hidden, weight, bias, ids, attn, comp, chunk_size=chunk, **kw)
    assert counter.calls == 1 and len(recomputed) == 1 and recomputed[0] > chunk
    ref = reference(hidden, weight, bias, ids, attn, comp, **kw)
    assert_rel_close(out.loss.detach(), ref.loss.detach())
    for a, b in zip(grads(out, params), grads(ref, params)):
        assert_rel_close(a, b)
    for key, value in ref.metrics.items():
        assert out.metrics[key].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6), key


def test_one_pass_gradcheck_float64():
    hidden, weight, bias, ids, attn, comp = make_inputs(B=2, T=9, H=3, V=5, dtype=torch.float64, seed=12)

    def f(h, w, b):
        return orpo_loss_from_hidden(h, w, b, ids, attn, comp, beta=0.7, chunk_size=12).loss

    assert torch.autograd.gradcheck(f, (hidden, weight, bias))


def test_one_pass_accumulation_and_backward_scale(monkeypatch):
    """Micro-batches with window denominators sum to the full batch (one-pass path), and an
    upstream scale (loss / accumulation steps) scales every gradient."""
    B = 2
    hidden, weight, bias, ids, attn, comp = make_inputs(B=B, seed=3)
    counter = _CountOnePass(monkeypatch)
    full = orpo_loss_from_hidden(hidden, weight, bias, ids, attn, comp, beta=0.2, chunk_size=64)
    full_g = torch.autograd.grad(full.loss, [hidden, weight, bias])
    n_nll = nll_token_count(attn, comp)
    acc = [torch.zeros_like(hidden), torch.zeros_like(weight), torch.zeros_like(bias)]
    total = 0.0
    for i in range(B):
        rows = [i, i + B]
        out = orpo_loss_from_hidden(hidden[rows], weight, bias, ids[rows], attn[rows], comp[rows], beta=0.2,
                                    chunk_size=64, nll_denominator=n_nll, pair_denominator=B)
        total += out.loss.item()
        acc = [a + b for a, b in zip(acc, torch.autograd.grad(out.loss * 0.5, [hidden, weight, bias]))]
    assert counter.calls == 1 + B
    assert total == pytest.approx(full.loss.item(), rel=1e-6)
    for a, b in zip(acc, full_g):
        assert_rel_close(a, 0.5 * b)


def test_one_pass_frozen_head_and_low_precision(monkeypatch):
    counter = _CountOnePass(monkeypatch)
    hidden, weight, bias, ids, attn, comp = make_inputs(bias=False, seed=6)
    frozen = weight.detach()
    ref = reference(hidden, frozen, None, ids, attn, comp, beta=0.1)
    out = orpo_loss_from_hidden(hidden, frozen, None, ids, attn, comp, beta=0.1, chunk_size=64)
    out.loss.backward()
    assert frozen.grad is None
    (g_ref,) = torch.autograd.grad(ref.loss, [hidden])
    assert_rel_close(hidden.grad, g_ref)
    (ref_gh,) = torch.autograd.grad(reference(hidden, weight, None, ids, attn, comp, beta=0.1).loss, [hidden])
    for dtype in (torch.bfloat16, torch.float16):
        h = hidden.detach().to(dtype).requires_grad_(True)
        w = weight.detach().to(dtype).requires_grad_(True)
        out = orpo_loss_from_hidden(h, w, None, ids, attn, comp, beta=0.1, chunk_size=64)
        out.loss.backward()
        assert h.grad.dtype == dtype and w.grad.dtype == dtype
        assert torch.allclose(h.grad.float(), ref_gh, atol=5e-2 * ref_gh.abs().max().item())
    assert counter.calls == 3


def test_one_pass_has_no_tensor_larger_than_a_chunk_of_logits(monkeypatch):
    B, T, H, V, chunk = 2, 64, 4, 1000, 130
    hidden, weight, bias, ids, attn, comp = make_inputs(B=B, T=T, H=H, V=V, bias=False, seed=8)
    counter = _CountOnePass(monkeypatch)
    with _MaxNumel() as mode:
        out = orpo_loss_from_hidden(hidden, weight, None, ids, attn, comp, beta=0.1, chunk_size=chunk)
        out.loss.backward()
    assert counter.calls == 1
    assert mode.max_numel <= chunk * V, mode.max_numel

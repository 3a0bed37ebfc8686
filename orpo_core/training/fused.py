"""Chunked, fused lm-head + ORPO loss in plain PyTorch.

The unfused loss needs the ``[2B, T, V]`` logits (and, in backward, a gradient of
the same size): for a 150k-token vocabulary, 2 x 1024 tokens of a pair that is
1.2 GB in float32 each. Here the lm-head projection is fused with the
log-softmax: the hidden states of the *needed* target positions only (completion
tokens of every row, plus the chosen rows' NLL tokens) are projected
``chunk_size`` tokens at a time, each chunk is reduced at once to a per-token
target log-probability ``z[target] - logsumexp(z)`` and a logit sum, and
discarded. A custom :class:`torch.autograd.Function` saves only the gathered
hidden states, the weight (a reference), the targets and the per-token
log-sum-exp; its backward recomputes each chunk's logits and softmax and
accumulates ``grad_hidden`` and ``grad_weight`` / ``grad_bias``
(``d logp / d z = onehot(target) - softmax(z)``). Peak extra memory is
``O(chunk_size * V)`` (plus a ``V * H`` float32 weight-gradient accumulator
when the lm-head is trainable), never ``O(N_tokens * V)``.

When a gradient is needed, the default path (:class:`_OnePassORPO`) avoids the
recomputation: target tokens are grouped by whole pairs (at most ``chunk_size``
tokens per group), each pair's ORPO terms depend only on its own tokens, so the
per-token gradient ``dloss/dlogp`` is known as soon as a group's logits exist and
the logit gradient is applied to the hidden states and the weight right away; the
backward only rescales the stored gradients. That is 3 lm-head matmuls per token
instead of 4, with the same ``O(chunk_size * V)`` peak. Pairs with more than
``chunk_size`` target tokens (in the same batch as shorter ones), ``softcap`` models and
``one_pass=False`` use the recomputing :class:`_LMHeadTargetLogps`.

This is the same idea as Liger-Kernel's ``LigerFusedLinearORPOLoss`` / Apple's
"Cut Your Losses" (arXiv 2411.09009), written without Triton so it runs on CPU.
The ORPO algebra after the per-token log-probs is shared with
:mod:`orpo_core.training.loss` so both paths give identical values.

Precision: the projection runs in the lm-head weight's dtype (bf16/fp16/fp32;
hidden states are cast to it), or in ``matmul_dtype`` when given (bf16 mixed
precision with float32 master weights: the weight is cast once per call, the
forward, gradient matmuls and backward recomputation all use that one copy);
logits, log-sum-exp, softmax, the per-token log-probs, the ORPO algebra and the
weight/bias-gradient accumulators are float32 (float64 when the weight is float64,
which makes ``torch.autograd.gradcheck`` usable), and the weight gradient is returned
in the master weight's dtype.
"""

from __future__ import annotations

import contextlib

import torch

from orpo_core.training.loss import (
    ORPOLossOutput,
    _check_weights,
    _compute_dtype,
    check_rows,
    _orpo_from_token_logps,
    odds_ratio_loss,
    orpo_target_masks,
)

__all__ = ["orpo_loss_from_hidden", "per_token_logps_from_hidden", "lm_head_transform_from_config"]


def lm_head_transform_from_config(config) -> tuple[float | None, float | None]:
    """``(logit_scale, softcap)`` a transformers model applies after its lm-head.

    Reads ``final_logit_softcapping`` (Gemma 2/3: ``z = c * tanh(z / c)``) and
    ``logit_scale`` (Cohere: ``z = z * s``) from ``config`` (or its ``text_config``).
    Returns ``(None, None)`` for plain models (Llama, Qwen, SmolLM, Mistral, ...).
    Models that rescale logits some other way (e.g. Granite's ``logits_scaling``,
    a divisor) raise ``NotImplementedError`` rather than silently training on other
    logits than the model's.
    """
    cfgs = [config, getattr(config, "text_config", None)]
    scale = softcap = None
    for cfg in cfgs:
        if cfg is None:
            continue
        if getattr(cfg, "final_logit_softcapping", None):
            softcap = float(cfg.final_logit_softcapping)
        if getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
            scale = float(cfg.logit_scale)
        if getattr(cfg, "logits_scaling", None) not in (None, 1, 1.0):
            raise NotImplementedError(
                f"fused ORPO loss: logits_scaling={cfg.logits_scaling} (Granite) is not supported; "
                "set orpo.fused_loss: false"
            )
    return scale, softcap


# --------------------------------------------------------------------------- chunk kernels
def _no_autocast(device_type: str):
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.autocast(device_type=device_type, enabled=False)
    except (RuntimeError, TypeError):  # device type without autocast support
        pass
    return contextlib.nullcontext()


def _mm_weight(weight: torch.Tensor, matmul_dtype: torch.dtype | None) -> torch.Tensor:
    """The lm-head weight the projection matmuls use: ``weight`` itself, or one detached copy
    in ``matmul_dtype`` (bf16/fp16 mixed precision over float32 master weights)."""
    if matmul_dtype is None or matmul_dtype == weight.dtype:
        return weight
    return weight.detach().to(matmul_dtype)


def _logit_buffer(n: int, chunk_size: int, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Reusable ``[min(chunk_size, n), V]`` buffers for the chunk logits: ``(raw, z)``, the
    projection's output in the weight dtype and the compute-dtype (float32) logits (the same
    tensor when the weight is float32/float64); None when ``n == 0``. Reusing them spares
    fresh large allocations (and their page faults) per chunk; a low-precision ``raw`` buffer
    is also reused for the low-precision copy of the softmax in the gradient matmuls."""
    if n == 0:
        return None
    rows = min(chunk_size, n)
    raw = torch.empty(rows, weight.shape[0], dtype=weight.dtype, device=weight.device)
    cdt = _compute_dtype(weight.dtype)
    z = raw if weight.dtype == cdt else torch.empty(rows, weight.shape[0], dtype=cdt, device=weight.device)
    return raw, z


def _chunk_logits(h, weight, bias, scale, softcap, out=None):
    """``[C, H]`` hidden -> ``(z, dz/draw)``: float32 ``[C, V]`` final logits and the
    derivative of the post-projection transform (None when it is the identity or a
    constant scale, which is returned as a float). ``out``: buffers from
    :func:`_logit_buffer` to write the logits into (their first ``C`` rows)."""
    # The projection runs in the weight dtype even under autocast, so that the forward
    # and the backward recomputation see bit-identical logits.
    c = h.shape[0]
    with _no_autocast(h.device.type):
        hw = h.to(weight.dtype)
        if out is not None:
            raw = out[0][:c]
            if bias is None:
                torch.mm(hw, weight.t(), out=raw)
            else:
                torch.addmm(bias.to(weight.dtype), hw, weight.t(), out=raw)
        else:
            raw = hw @ weight.t()
            if bias is not None:
                raw = raw + bias.to(raw.dtype)
    if out is not None:
        z = out[1][:c]
        if z is not raw:
            z.copy_(raw)  # float32 logits from the low-precision product
    else:
        z = raw.to(_compute_dtype(weight.dtype))
    del raw
    deriv: torch.Tensor | float | None = None
    if scale is not None:
        z.mul_(scale)
        deriv = scale
    if softcap is not None:
        z.div_(softcap).tanh_()
        tanh_deriv = 1.0 - z.square()
        deriv = tanh_deriv if deriv is None else tanh_deriv.mul_(deriv)
        z.mul_(softcap)
    return z, deriv


def _exp_shifted(z: torch.Tensor, targets: torch.Tensor):
    """``z`` ``[C, V]`` logits -> ``(e, s, lse, z_t)``: ``z`` overwritten in place with
    ``e = exp(z - max z)``, its row sums ``s`` (``softmax(z) = e / s``), ``lse = logsumexp(z)``
    and the target logits ``z_t`` (``[C]`` each, read before the overwrite). No temporary
    of the ``[C, V]`` size."""
    z_t = z.gather(1, targets.unsqueeze(1)).squeeze(1)
    z_max = z.amax(1)
    e = z.sub_(z_max.unsqueeze(1)).exp_()
    s = e.sum(-1)
    return e, s, s.log().add_(z_max), z_t


def _chunked_forward(h, weight, bias, targets, chunk_size, scale, softcap, want_lse):
    """Per-token ``z[target] - logsumexp(z)`` (float32 ``[N]``), ``sum_v z`` (float32 ``[N]``)
    and, when ``want_lse``, ``logsumexp(z)`` (float32 ``[N]``). ``weight`` is the matmul
    weight (see :func:`_mm_weight`)."""
    n = h.shape[0]
    cdt = _compute_dtype(weight.dtype)
    logps = torch.empty(n, dtype=cdt, device=h.device)
    sums = torch.empty(n, dtype=cdt, device=h.device)
    lse = torch.empty(n, dtype=cdt, device=h.device) if want_lse else None
    buf = _logit_buffer(n, chunk_size, weight)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        z, _ = _chunk_logits(h[start:end], weight, bias, scale, softcap, out=buf)
        sums[start:end] = z.sum(-1)
        _, _, chunk_lse, z_t = _exp_shifted(z, targets[start:end])
        logps[start:end] = z_t - chunk_lse
        if lse is not None:
            lse[start:end] = chunk_lse
        del z
    return logps, sums, lse


def _softmax_head_grads(e, g, w, t, h, weight, grad_w, grad_b, need_h, lp_buf=None):
    """Gradients of ``sum_i g_i * logp_i`` for one chunk, with ``logp_i = z_i[t_i] - lse(z_i)``.

    ``d/dz_i = g_i * onehot(t_i) - w_i * e_i`` where ``e`` ``[C, V]`` (compute dtype) is
    ``softmax(z)`` up to a per-row factor that ``w`` ``[C]`` carries (``e = exp(z - max z)``,
    ``w = g / sum(e)``; or ``e = softmax(z)``, ``w = g``). The factors go on ``[C, H]``
    operands and the one-hot part is a gather / scatter, so the only ``[C, V]`` work is the
    two matmuls with ``e``. Accumulates into ``grad_w`` ``[V, H]`` / ``grad_b`` ``[V]``
    (compute dtype, either may be None) and returns ``grad_h`` ``[C, H]`` (compute dtype)
    when ``need_h``, else None. ``lp_buf``: a free ``[>= C, V]`` buffer in the weight dtype
    to hold the low-precision copy of ``e`` (None: a new tensor).
    """
    cdt = e.dtype
    if weight.dtype == cdt:
        e_c = e
    elif lp_buf is not None:  # one low-precision copy for both matmuls
        e_c = lp_buf[: e.shape[0]].copy_(e)
    else:
        e_c = e.to(weight.dtype)
    gh = None
    if need_h:  # g * W[t] - w * (e @ W)
        gh = g.unsqueeze(1) * weight.index_select(0, t).to(cdt)
        gh.sub_(w.unsqueeze(1) * (e_c @ weight).to(cdt))
    if grad_w is not None:
        hc = h.to(cdt)
        if weight.dtype == cdt:
            grad_w.addmm_(e.t(), hc * w.unsqueeze(1), alpha=-1.0)
        else:  # product in the weight dtype, accumulated in float32
            grad_w -= (e_c.t() @ (hc * w.unsqueeze(1)).to(weight.dtype)).to(cdt)
        grad_w.index_add_(0, t, hc * g.unsqueeze(1))
    if grad_b is not None:
        grad_b -= e.t() @ w
        grad_b.index_add_(0, t, g)
    return gh


class _LMHeadTargetLogps(torch.autograd.Function):
    """``(h [N, H], weight [V, H], bias [V] | None, targets [N]) -> (logps [N], logit_sums [N])``.

    ``logps`` (float32) is differentiable w.r.t. ``h``, ``weight`` and ``bias``;
    ``logit_sums`` (float32, ``sum_v z``) is not (metrics only). Saved for backward:
    ``h``, ``weight``, ``bias``, ``targets`` and the per-token log-sum-exp.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_size, scale, softcap, matmul_dtype=None):
        wm = _mm_weight(weight, matmul_dtype)
        logps, sums, lse = _chunked_forward(h, wm, bias, targets, chunk_size, scale, softcap, want_lse=True)
        # the low-precision copy is saved (not re-cast in backward): the recomputed logits are
        # bit-identical to the forward's
        ctx.save_for_backward(h, wm, bias, targets, lse)
        ctx.master_dtype = weight.dtype
        ctx.chunk_size, ctx.scale, ctx.softcap = chunk_size, scale, softcap
        ctx.mark_non_differentiable(sums)
        return logps, sums

    @staticmethod
    def backward(ctx, grad_logps, _grad_sums):
        h, weight, bias, targets, lse = ctx.saved_tensors  # weight: the matmul copy
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = grad_w = grad_b = None
        if grad_logps is None or not (need_h or need_w or need_b):
            return grad_h, grad_w, grad_b, None, None, None, None, None
        cdt = _compute_dtype(weight.dtype)
        grad_logps = grad_logps.to(cdt)
        if need_h:
            grad_h = torch.empty_like(h)
        if need_w:
            grad_w = torch.zeros(weight.shape, dtype=cdt, device=weight.device)
        if need_b:
            grad_b = torch.zeros(bias.shape, dtype=cdt, device=bias.device)
        n = h.shape[0]
        rows = torch.arange(min(ctx.chunk_size, n), device=h.device)
        buf = _logit_buffer(n, ctx.chunk_size, weight)
        for start in range(0, n, ctx.chunk_size):
            end = min(start + ctx.chunk_size, n)
            g = grad_logps[start:end]
            t = targets[start:end]
            z, deriv = _chunk_logits(h[start:end], weight, bias, ctx.scale, ctx.softcap, out=buf)
            p = z.sub_(lse[start:end].unsqueeze(1)).exp_()  # softmax, in place
            if ctx.softcap is None:
                # d logp / d raw = s * (onehot(t) - p) for z = s * raw: the per-token factor
                # g * s goes on the [C, H] operands, the one-hot part is a gather / scatter
                gs = g * (ctx.scale if ctx.scale is not None else 1.0)
                gh = _softmax_head_grads(p, gs, gs, t, h[start:end], weight, grad_w, grad_b, need_h,
                                         lp_buf=buf[0] if buf is not None else None)
                if gh is not None:
                    grad_h[start:end] = gh.to(h.dtype)
                del p, z, deriv, gh
                continue
            # softcap: elementwise transform derivative, grad_z = g * (onehot - p) * dz/draw
            grad_z = p.mul_(-g.unsqueeze(1))
            grad_z[rows[: end - start], t] += g
            grad_z.mul_(deriv)
            del deriv
            if need_b:
                grad_b += grad_z.sum(0)
            grad_z_c = grad_z.to(weight.dtype)
            del grad_z, z, p
            if need_h:
                grad_h[start:end] = (grad_z_c @ weight).to(h.dtype)
            if need_w:
                h_c = h[start:end].to(weight.dtype)
                if grad_w.dtype == weight.dtype:
                    grad_w.addmm_(grad_z_c.t(), h_c)  # in place: no [V, H] temporary per chunk
                else:  # bf16/fp16: product in the weight dtype, accumulated in float32
                    grad_w += grad_z_c.t() @ h_c
            del grad_z_c
        if grad_w is not None:
            grad_w = grad_w.to(ctx.master_dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


class _OnePassORPO(torch.autograd.Function):
    """Fused lm-head + ORPO loss whose gradient is computed during the forward pass.

    ``(h [M, H], weight [V, H], bias [V] | None, ...) -> (loss [], logps [N], logit_sums [N])``.

    The grad-carrying target tokens are sorted by pair and processed in groups of whole
    pairs (at most ``chunk_size`` tokens per group). A pair's ORPO terms depend only on
    its own tokens (the NLL and pair denominators are fixed for the batch), so once a
    group's logits ``z [n, V]`` are projected the per-token gradient
    ``g_i = dloss/dlogp_i`` is known (a small autograd pass over ``n`` scalars through
    :func:`orpo_core.training.loss.odds_ratio_loss`), and the logit gradient
    ``g_i * (onehot(t_i) - softmax(z_i))`` is applied to ``h`` and ``weight`` at once.
    The backward only scales the stored ``grad_h`` / ``grad_weight`` by the incoming
    scalar, so the lm-head costs 3 matmuls per token instead of the 4 of the
    recomputing :class:`_LMHeadTargetLogps` (the same trade Liger-Kernel's
    ``LigerFusedLinearORPOFunction`` makes, in plain PyTorch). ``softmax`` is never
    formed: with ``e = exp(z - max z)`` and ``s = sum e``, ``p = e / s`` and the ``1 / s``
    is folded into ``[n, H]``-sized operands.

    Saved between forward and backward: ``grad_h`` ``[M, H]`` (zero outside the gathered
    rows) and, when ``weight`` / ``bias`` need grad, float32 ``grad_weight`` ``[V, H]``
    (and ``grad_bias`` ``[V]``), as the recomputing backward would allocate anyway.
    """

    @staticmethod
    def forward(ctx, h_all, weight, bias, *args):
        # explicit dtypes throughout: the gradient matmuls are not autocast (as in a backward pass)
        with _no_autocast(h_all.device.type):
            return _OnePassORPO._forward(ctx, h_all, weight, bias, *args)

    @staticmethod
    def _forward(ctx, h_all, weight, bias, hrows, targets, rows, is_logp, is_nll, counts, groups, n_pairs,
                 beta, alpha, nll_den, pair_den, scale, chunk_size, matmul_dtype=None):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        cdt = _compute_dtype(weight.dtype)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        weight = _mm_weight(weight, matmul_dtype)  # master dtype kept in ctx.dtypes for the gradient
        dev = h_all.device
        n = hrows.shape[0]
        logps = torch.empty(n, dtype=cdt, device=dev)
        sums = torch.empty(n, dtype=cdt, device=dev)
        grad_h = torch.zeros_like(h_all) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=cdt, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=cdt, device=bias.device) if need_b else None
        loss = torch.zeros((), dtype=cdt, device=dev)
        buf = _logit_buffer(n, chunk_size, weight)
        half = n_pairs
        for start, end, pair_list in groups:
            h = h_all.index_select(0, hrows[start:end])
            t = targets[start:end]
            z, _ = _chunk_logits(h, weight, bias, scale, None, out=buf)
            sums[start:end] = z.sum(-1)
            e, s, lse, z_t = _exp_shifted(z, t)
            lp = z_t - lse
            logps[start:end] = lp

            # dloss/dlogp of this group's tokens (exact ORPO algebra of orpo_core.training.loss)
            with torch.enable_grad():
                lpg = lp.detach().requires_grad_(True)
                r = rows[start:end]
                group_loss = lpg.new_zeros(())
                if beta != 0:
                    sel = is_logp[start:end]
                    seq = torch.zeros(2 * half, dtype=cdt, device=dev).index_add(0, r[sel], lpg[sel]) / counts
                    pidx = torch.tensor(pair_list, device=dev)
                    or_losses, _ = odds_ratio_loss(seq[pidx], seq[pidx + half], beta)
                    group_loss = group_loss + or_losses.sum() / pair_den
                if alpha != 0:
                    seln = is_nll[start:end]
                    group_loss = group_loss - alpha * lpg[seln].sum() / nll_den
                (g,) = torch.autograd.grad(group_loss, lpg)
            loss += group_loss.detach()
            if scale is not None:
                g = g * scale  # z = scale * raw: dloss/draw = scale * dloss/dz
            gh = _softmax_head_grads(e, g, g / s, t, h, weight, grad_w, grad_b, need_h,
                                     lp_buf=buf[0] if buf is not None else None)
            if gh is not None:
                grad_h.index_copy_(0, hrows[start:end], gh.to(h_all.dtype))
            del e, z, gh
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.mark_non_differentiable(logps, sums)
        return loss, logps, sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_logps, _grad_sums):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        # the loss is usually backpropagated with grad 1 (no scaler): hand the saved gradients
        # over as they are instead of a scaled copy (a second [V, H] buffer)
        unit = grad_loss.numel() == 1 and float(grad_loss) == 1.0
        if grad_h is not None and not unit:
            grad_h = grad_h * grad_loss.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w if unit else grad_w * grad_loss.to(grad_w.dtype)).to(w_dtype)
        if grad_b is not None:
            grad_b = (grad_b if unit else grad_b * grad_loss.to(grad_b.dtype)).to(b_dtype)
        return (grad_h, grad_w, grad_b) + (None,) * 15


def _pair_groups(pair_of_token: torch.Tensor, n_pairs: int, chunk_size: int) -> list[tuple[int, int, list[int]]]:
    """Groups of consecutive pairs with at most ``chunk_size`` tokens each, as
    ``(token_start, token_end, pair_indices)`` (``pair_of_token`` sorted; pairs without
    tokens are left out).

    Raises:
        ValueError: one pair alone has more than ``chunk_size`` tokens.
    """
    counts = torch.bincount(pair_of_token, minlength=n_pairs).tolist()
    if counts and max(counts) > chunk_size:
        raise ValueError(f"a pair has {max(counts)} target tokens, more than chunk_size={chunk_size}")
    groups: list[tuple[int, int, list[int]]] = []
    start = acc = 0
    pairs: list[int] = []
    for b, c in enumerate(counts):
        if c == 0:
            continue
        if acc + c > chunk_size:
            groups.append((start, start + acc, pairs))
            start, acc, pairs = start + acc, 0, []
        acc += c
        pairs.append(b)
    if acc:
        groups.append((start, start + acc, pairs))
    return groups


def _check_head(hidden, weight, bias, chunk_size, scale, softcap):
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"lm_head_weight must be [V, H] with H = hidden.shape[-1]; got weight {tuple(weight.shape)}, "
            f"hidden {tuple(hidden.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"lm_head_bias must be [V]={weight.shape[0]}, got {tuple(bias.shape)}")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0, got {softcap}")
    if scale is not None and scale <= 0:
        raise ValueError(f"logit_scale must be > 0, got {scale}")


def _target_logps(h, weight, bias, targets, chunk_size, scale, softcap, grad: bool, matmul_dtype=None):
    """Differentiable (``grad=True``) or no-grad per-token logps and logit sums of ``h [N, H]``."""
    if h.shape[0] == 0:
        empty = h.new_zeros(0, dtype=_compute_dtype(weight.dtype))
        return empty, empty
    if grad and torch.is_grad_enabled():
        return _LMHeadTargetLogps.apply(h, weight, bias, targets, chunk_size, scale, softcap, matmul_dtype)
    with torch.no_grad():
        logps, sums, _ = _chunked_forward(h, _mm_weight(weight, matmul_dtype), bias, targets, chunk_size, scale,
                                          softcap, want_lse=False)
    return logps, sums


def per_token_logps_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int = 1024,
    *,
    logit_scale: float | None = None,
    softcap: float | None = None,
    matmul_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Log-probabilities of ``targets`` under ``lm_head(hidden)``, chunked (for evaluation).

    Args:
        hidden: ``[..., H]`` hidden states (any float dtype; cast to the weight dtype for the
            projection).
        weight: ``[V, H]`` lm-head weight; ``bias``: ``[V]`` or None.
        targets: ``[...]`` int token ids **already aligned** with ``hidden``: ``targets[i]``
            is the token predicted from ``hidden[i]`` (for a causal LM pass
            ``hidden[:, :-1]`` and ``input_ids[:, 1:]``).
        mask: ``[...]`` bool/0-1, positions to score.
        chunk_size: tokens projected at a time (peak extra memory ``O(chunk_size * V)``).
        logit_scale, softcap: post-projection transform, see :func:`lm_head_transform_from_config`.
        matmul_dtype: dtype of the projection matmul (e.g. ``torch.bfloat16`` for bf16 mixed
            precision over a float32 weight); None: the weight's dtype. Log-softmax is float32.

    Returns:
        ``[N]`` float32 log-probs (nats) of the ``N = mask.sum()`` masked positions in
        row-major order; differentiable when grad is enabled.

    Raises:
        ValueError: shapes disagree, bad ``chunk_size``.
    """
    _check_head(hidden, weight, bias, chunk_size, logit_scale, softcap)
    if targets.shape != hidden.shape[:-1] or mask.shape != targets.shape:
        raise ValueError(
            f"targets {tuple(targets.shape)} and mask {tuple(mask.shape)} must equal hidden.shape[:-1] "
            f"{tuple(hidden.shape[:-1])}"
        )
    flat = mask.reshape(-1).bool().nonzero().squeeze(1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat)
    t = targets.reshape(-1).index_select(0, flat).long()
    logps, _ = _target_logps(h, weight, bias, t, chunk_size, logit_scale, softcap, grad=True, matmul_dtype=matmul_dtype)
    return logps


def orpo_loss_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lm_head_bias: torch.Tensor | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    beta: float,
    alpha: float = 1.0,
    chunk_size: int = 1024,
    nll_on_prompt: bool = True,
    nll_denominator: float | torch.Tensor | None = None,
    pair_denominator: float | torch.Tensor | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    one_pass: bool = True,
    matmul_dtype: torch.dtype | None = None,
) -> ORPOLossOutput:
    """Fused lm-head + ORPO loss; same values and gradients as
    :func:`orpo_core.training.loss.orpo_loss_from_logits` on ``logits = lm_head(hidden)``.

    Args:
        hidden: ``[2B, T, H]`` last hidden states (after the final norm), rows laid out as in
            :mod:`orpo_core.training.loss` (chosen rows first). bf16/fp16/fp32.
        lm_head_weight: ``[V, H]`` (bf16/fp16/fp32; the projection runs in this dtype,
            log-sum-exp and softmax in float32). May be frozen (LoRA): no weight gradient
            is computed then.
        lm_head_bias: ``[V]`` or None.
        input_ids, attention_mask, completion_mask: ``[2B, T]``, see
            :func:`orpo_core.training.loss.orpo_target_masks`.
        beta, alpha, nll_on_prompt, nll_denominator, pair_denominator: as in
            :func:`orpo_core.training.loss.orpo_loss_from_logits`. A term whose weight is 0 is
            computed without graph (its tokens go through a no-grad pass, metrics only).
        chunk_size: tokens projected at a time (flattened over the batch; only positions
            that are targets of the log-prob or NLL masks are projected at all).
        logit_scale: multiply logits by this (Cohere's ``logit_scale``); None = 1.
        softcap: final logit soft-capping ``z = softcap * tanh(z / softcap)`` (Gemma 2's
            ``final_logit_softcapping``), applied after ``logit_scale``; None = off.
        one_pass: when a gradient is needed, compute it during the forward pass
            (:class:`_OnePassORPO`: groups of whole pairs of at most ``chunk_size`` target
            tokens, 3 lm-head matmuls per token instead of 4). Pairs with more than
            ``chunk_size`` target tokens, ``softcap`` models and ``one_pass=False`` use the
            backward that recomputes each chunk's logits (:class:`_LMHeadTargetLogps`). Both
            give the same loss and gradients.
        matmul_dtype: dtype of the lm-head matmuls (forward and gradient), e.g.
            ``torch.bfloat16`` under bf16 mixed precision with a float32 ``lm_head_weight``:
            the weight is cast once per call; logits, softmax, log-probs, the ORPO terms and the
            weight-gradient accumulator stay float32 and the weight gradient is returned in the
            weight's dtype. None: the weight's dtype (also under autocast).

    Returns:
        :class:`orpo_core.training.loss.ORPOLossOutput`; ``logits/*`` metrics are the mean of the
        final (scaled/capped) logits over completion tokens and the vocabulary. On the
        one-pass path only ``loss`` carries the graph (``chosen_logps`` /
        ``rejected_logps`` are detached).

    Raises:
        ValueError: bad shapes/masks/weights (see :func:`orpo_core.training.loss.orpo_target_masks`).
    """
    check_rows("hidden", "[2B, T, H]", hidden, input_ids)
    _check_head(hidden, lm_head_weight, lm_head_bias, chunk_size, logit_scale, softcap)
    _check_weights(beta, alpha, nll_denominator, pair_denominator)
    logp_mask, nll_mask = orpo_target_masks(input_ids, attention_mask, completion_mask, nll_on_prompt)
    n_rows, seq_len, hid = hidden.shape
    # target position j (0..T-2) of row r is token input_ids[r, j+1], predicted from hidden[r, j]
    grad_mask = torch.zeros_like(logp_mask)
    if beta != 0:
        grad_mask |= logp_mask
    if alpha != 0:
        grad_mask |= nll_mask
    metric_mask = (logp_mask | nll_mask) & ~grad_mask

    flat_hidden = hidden.reshape(-1, hid)  # a view for contiguous hidden (no [2B, T-1, H] copy)
    flat_targets = input_ids[:, 1:].reshape(-1).long()
    n_flat = flat_targets.shape[0]
    cdt = _compute_dtype(lm_head_weight.dtype)
    token_logps = torch.zeros(n_flat, dtype=cdt, device=hidden.device)
    token_sums = torch.zeros(n_flat, dtype=cdt, device=hidden.device)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, lm_head_weight, lm_head_bias)
    )
    half = n_rows // 2
    nll_den = nll_mask.sum().clamp(min=1).to(cdt) if nll_denominator is None else nll_denominator
    pair_den = half if pair_denominator is None else pair_denominator
    one_pass_loss = long_pairs = None
    recompute_mask = grad_mask
    if needs_grad and one_pass and softcap is None:
        one_pass_loss, long_pairs = _one_pass(
            flat_hidden, lm_head_weight, lm_head_bias, flat_targets, grad_mask, logp_mask, nll_mask,
            token_logps, token_sums, seq_len=seq_len, beta=beta, alpha=alpha, nll_den=nll_den,
            pair_den=pair_den, scale=logit_scale, chunk_size=chunk_size, matmul_dtype=matmul_dtype,
        )
        if one_pass_loss is not None:  # pairs over chunk_size tokens go through the recomputing path
            recompute_mask = grad_mask & long_pairs.repeat(2).unsqueeze(1)
    for mask, grad in ((recompute_mask, True), (metric_mask, False)):
        idx = mask.reshape(-1).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        # grid index r * (T-1) + j  ->  hidden row r * T + j
        h = flat_hidden.index_select(0, idx + idx // (seq_len - 1))
        logps, sums = _target_logps(
            h, lm_head_weight, lm_head_bias, flat_targets.index_select(0, idx), chunk_size, logit_scale, softcap, grad,
            matmul_dtype=matmul_dtype,
        )
        token_logps = token_logps.index_put((idx,), logps)
        token_sums.index_put_((idx,), sums.detach())
    vocab = lm_head_weight.shape[0]
    # on the one-pass path the token log-probs are detached: compute metrics without a graph
    with torch.no_grad() if one_pass_loss is not None else contextlib.nullcontext():
        out = _orpo_from_token_logps(
            token_logps.view(n_rows, seq_len - 1), (token_sums / vocab).view(n_rows, seq_len - 1), logp_mask, nll_mask,
            beta=beta, alpha=alpha, nll_denominator=nll_denominator, pair_denominator=pair_denominator,
        )
    if one_pass_loss is not None:
        loss = one_pass_loss
        if bool(long_pairs.any()):  # their share of the loss, with the batch's denominators
            pairs = long_pairs.nonzero().squeeze(1)
            rows = torch.cat([pairs, pairs + half])
            loss = loss + _orpo_from_token_logps(
                token_logps.view(n_rows, seq_len - 1)[rows],
                (token_sums / vocab).view(n_rows, seq_len - 1)[rows],
                logp_mask[rows],
                nll_mask[rows],
                beta=beta,
                alpha=alpha,
                nll_denominator=nll_den,
                pair_denominator=pair_den,
            ).loss
        out.loss = loss
    return out


def _one_pass(flat_hidden, weight, bias, flat_targets, grad_mask, logp_mask, nll_mask, token_logps, token_sums, *,
              seq_len, beta, alpha, nll_den, pair_den, scale, chunk_size, matmul_dtype=None):
    """Run :class:`_OnePassORPO` over the grad-carrying tokens of the pairs that have at most
    ``chunk_size`` of them; fill ``token_logps`` / ``token_sums`` (detached) at those positions.

    Returns:
        ``(loss, long_pairs)``: their differentiable share of the loss and a ``[B]`` bool mask
        of the pairs left to the caller (more than ``chunk_size`` tokens); ``(None, None)``
        (nothing filled) when no pair fits.
    """
    n_rows = grad_mask.shape[0]
    half = n_rows // 2
    idx = grad_mask.reshape(-1).nonzero().squeeze(1)
    if idx.numel() == 0:
        return None, None
    row = idx // (seq_len - 1)
    pair = row % half
    long_pairs = torch.bincount(pair, minlength=half) > chunk_size
    keep = ~long_pairs[pair]
    if not bool(keep.any()):
        return None, None
    idx, row, pair = idx[keep], row[keep], pair[keep]
    order = torch.argsort(pair, stable=True)
    idx, row, pair = idx[order], row[order], pair[order]
    groups = _pair_groups(pair, half, chunk_size)
    cdt = _compute_dtype(weight.dtype)
    counts = logp_mask.sum(-1).to(cdt)
    loss, logps, sums = _OnePassORPO.apply(
        flat_hidden, weight, bias, idx + idx // (seq_len - 1), flat_targets.index_select(0, idx), row,
        logp_mask.reshape(-1).index_select(0, idx), nll_mask.reshape(-1).index_select(0, idx), counts, groups,
        half, beta, alpha, nll_den, pair_den, scale, chunk_size, matmul_dtype,
    )
    token_logps.index_put_((idx,), logps)
    token_sums.index_put_((idx,), sums)
    return loss, long_pairs

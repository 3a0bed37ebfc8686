"""ORPO objective (Hong et al. 2024, "ORPO: Monolithic Preference Optimization
without Reference Model", arXiv 2403.07691) on materialised logits.

Batch layout (shared with :mod:`orpo_core.training.fused` and the trainer)
-----------------------------------------------------------------
A batch of ``B`` preference pairs is one ``[2B, T]`` tensor of token ids:
rows ``0..B-1`` are *prompt + chosen*, rows ``B..2B-1`` are *prompt + rejected*,
right padded. Two masks of the same shape index **target** positions, aligned
with ``input_ids`` (not shifted):

* ``attention_mask``  1 on real tokens, 0 on padding;
* ``completion_mask`` 1 on completion tokens (the assistant turn including its
  end-of-turn token), 0 on the prompt and on padding.

Token ``t`` is predicted from position ``t - 1``; every function here shifts
internally, so position 0 can never be a target (a completion mask that is 1 at
position 0 is rejected).

Objective (paper eq. 6-7; TRL ``ORPOTrainer.get_batch_loss_metrics``)
---------------------------------------------------------------------
``L = alpha * L_NLL + beta * mean_i( -log sigmoid( log_odds_i ) )`` with

* ``log_odds = log(odds(y_w|x) / odds(y_l|x))``,
  ``odds(y|x) = P(y|x) / (1 - P(y|x))`` where ``log P(y|x)`` is the **average**
  per-token log-probability of the completion (TRL ``get_batch_logps(...,
  average_log_prob=True)``). With ``lc``/``lr`` the chosen/rejected average
  log-probs: ``log_odds = (lc - lr) - (log1mexp(lc) - log1mexp(lr))`` (TRL
  ``ORPOTrainer.odds_ratio_loss``).
* ``L_NLL`` is the token-mean cross-entropy of the *chosen* rows. As in the
  paper's code and TRL's ``concatenated_forward`` it covers the prompt tokens
  too (``nll_on_prompt=True``); ``nll_on_prompt=False`` restricts it to the
  completion tokens.
* ``beta`` is TRL's name for the paper's ``lambda``; ``alpha`` (default 1, not in
  the paper) weights the NLL term: ``alpha = 0`` is pure odds-ratio training,
  ``beta = 0`` is plain SFT on the chosen rows.

Everything numerically delicate (log-softmax, log1mexp, log-sigmoid) runs in
float32 (float64 inputs stay float64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = [
    "ORPOLossOutput",
    "completion_logps",
    "log1mexp",
    "odds_ratio_loss",
    "orpo_loss_from_logits",
    "orpo_target_masks",
    "nll_token_count",
    "LOG1MEXP_MAX_X",
]

#: ``log1mexp`` clamps its input to ``x <= LOG1MEXP_MAX_X`` (a completion with
#: average log-probability in ``(-1e-7, 0]``, i.e. probability within 1e-7 of 1,
#: is treated as having log-probability -1e-7). ``log(1 - exp(0)) = -inf`` and its
#: gradient is infinite; at -1e-7 the value is about -16.1 and the gradient
#: about -1e7, both finite in float32.
LOG1MEXP_MAX_X = -1e-7

_LN_HALF = -math.log(2.0)  # -0.6931471805599453, branch point of log1mexp


@dataclass
class ORPOLossOutput:
    """Result of :func:`orpo_loss_from_logits` / :func:`orpo_core.training.fused.orpo_loss_from_hidden`.

    Attributes:
        loss: scalar float32 tensor with grad, ``alpha * NLL + beta * OR`` (divided by
            the given denominators when they are set, see :func:`orpo_loss_from_logits`).
        chosen_logps: ``[B]`` float32, average log-prob of each chosen completion
            (carries grad when ``beta > 0``, detached otherwise).
        rejected_logps: ``[B]`` float32, same for the rejected completions.
        nll_loss: scalar float32, detached: token-mean NLL of this micro-batch's chosen
            rows (local mean, independent of ``nll_denominator``).
        metrics: TRL-named 0-dim detached float32 tensors of this micro-batch:
            ``rewards/chosen``, ``rewards/rejected`` (``beta * logps``),
            ``rewards/accuracies`` (fraction of pairs with ``lc > lr``),
            ``rewards/margins``, ``logps/chosen``, ``logps/rejected``,
            ``logits/chosen``, ``logits/rejected`` (mean logit over the completion
            tokens and the vocabulary), ``nll_loss``, ``log_odds_ratio``
            (``mean(logsigmoid(log_odds))``), ``log_odds_chosen`` (``mean(log_odds)``).
    """

    loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    nll_loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


# --------------------------------------------------------------------------- primitives
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[..., target]`` without a ``[..., V]`` log-softmax tensor.

    ``logits`` ``[B, T, V]`` (any float dtype), ``targets`` ``[B, T]`` int64 (valid ids).
    Returns ``[B, T]`` float32 (float64 for float64 logits): ``logit[target] - logsumexp(logits)``.
    Low-precision logits are upcast one row at a time so that at most one ``[T, V]``
    float32 copy is alive.
    """
    cdt = _compute_dtype(logits.dtype)
    if logits.dtype == cdt:
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(logits, dim=-1)
    rows = []
    for row_logits, row_targets in zip(logits, targets):
        row = row_logits.to(cdt)
        rows.append(row.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(row, dim=-1))
    return torch.stack(rows)


def completion_logps(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, average: bool = True
) -> torch.Tensor:
    """Per-sequence log-probability of the labelled tokens (TRL ``ORPOTrainer.get_batch_logps``).

    Args:
        logits: ``[B, T, V]`` float (any dtype), the model output for ``input_ids``.
        labels: ``[B, T]`` int, **unshifted**, aligned with ``input_ids`` (``labels[:, t]`` is
            the token at position ``t``, predicted from the logits at ``t - 1``; the shift
            is done here). Positions equal to ``ignore_index`` (prompt, padding) are excluded.
        ignore_index: label value of excluded positions.
        average: True: mean log-prob over the labelled tokens (ORPO's ``log P(y|x)``);
            False: their sum.

    Returns:
        ``[B]`` float32 (float64 for float64 logits), in nats; differentiable w.r.t. ``logits``.
        Computed as ``logit[target] - logsumexp(logits)`` per position; no ``[B, T, V]``
        log-softmax tensor is materialised.

    Raises:
        ValueError: shapes disagree, or (``average=True``) a row has no labelled token
            (its average would be 0/0); the message names the row.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"completion_logps: logits must be [B, T, V] and labels [B, T]; got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    labels = labels[:, 1:]
    mask = labels != ignore_index
    counts = mask.sum(-1)
    if average and bool((counts == 0).any()):
        bad = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"completion_logps: row(s) {bad} have no labelled target token (labels all {ignore_index})")
    per_token = _token_logps(logits[:, :-1], torch.where(mask, labels, 0).long())
    summed = torch.where(mask, per_token, 0.0).sum(-1)
    return summed / counts.to(summed.dtype) if average else summed


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """Numerically stable ``log(1 - exp(x))`` for ``x <= 0`` (elementwise, same shape and dtype).

    Uses ``log1p(-exp(x))`` for ``x < -ln 2`` and ``log(-expm1(x))`` otherwise
    (Maechler 2012, "Accurately computing log(1 - exp(-|a|))"; same branch as TRL's
    ``log1mexp``). ``x`` is first clamped to ``x <= LOG1MEXP_MAX_X`` (-1e-7) so that
    ``x = 0`` (probability exactly 1) gives a finite value (about -16.1) and a finite
    gradient instead of ``-inf``/NaN; positive ``x`` (not a log-probability, e.g. float
    rounding) is clamped the same way. The gradient is 0 where the clamp is active.
    """
    x = x.clamp(max=LOG1MEXP_MAX_X)
    # Both branches are evaluated by torch.where; feed each one only inputs in its
    # own domain so neither produces inf/NaN (whose gradient would leak as NaN).
    small = x < _LN_HALF
    x_small = torch.where(small, x, torch.full_like(x, -1.0))
    x_big = torch.where(small, torch.full_like(x, -0.5), x)
    return torch.where(small, torch.log1p(-torch.exp(x_small)), torch.log(-torch.expm1(x_big)))


def odds_ratio_loss(
    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO's odds-ratio term per pair (paper eq. 7; TRL ``ORPOTrainer.odds_ratio_loss``).

    Args:
        chosen_logps: ``[B]`` average log-prob of the chosen completions (``<= 0``, nats).
        rejected_logps: ``[B]`` same for the rejected completions.
        beta: weight of the term (the paper's lambda).

    Returns:
        ``(losses, metrics)``: ``losses`` ``[B]`` float32 (float64 for float64 input),
        ``beta * -logsigmoid(log_odds)`` with
        ``log_odds = (lc - lr) - (log1mexp(lc) - log1mexp(lr))``; TRL returns the
        negated value ``beta * logsigmoid(log_odds)`` and subtracts its mean.
        ``metrics`` (detached 0-dim tensors): ``rewards/chosen``, ``rewards/rejected``,
        ``rewards/margins`` (``beta * logps`` means, as TRL), ``rewards/accuracies``
        (fraction with ``lc > lr``; TRL compares the rewards, identical for ``beta > 0``
        and still informative at ``beta = 0``), ``log_odds_ratio`` (mean logsigmoid) and
        ``log_odds_chosen`` (mean log-odds), plus ``log_odds`` (``[B]``, detached).

    Raises:
        ValueError: the two inputs differ in shape.
    """
    if chosen_logps.shape != rejected_logps.shape:
        raise ValueError(
            f"odds_ratio_loss: chosen_logps {tuple(chosen_logps.shape)} and rejected_logps "
            f"{tuple(rejected_logps.shape)} differ in shape"
        )
    cdt = _compute_dtype(chosen_logps.dtype)
    lc = chosen_logps.to(cdt)
    lr = rejected_logps.to(cdt)
    log_odds = (lc - lr) - (log1mexp(lc) - log1mexp(lr))
    ratio = F.logsigmoid(log_odds)
    losses = -beta * ratio
    with torch.no_grad():
        rc, rr = beta * lc.detach(), beta * lr.detach()
        metrics = {
            "rewards/chosen": rc.mean(),
            "rewards/rejected": rr.mean(),
            "rewards/accuracies": (lc.detach() > lr.detach()).to(cdt).mean(),
            "rewards/margins": (rc - rr).mean(),
            "log_odds_ratio": ratio.detach().mean(),
            "log_odds_chosen": log_odds.detach().mean(),
            "log_odds": log_odds.detach(),
        }
    return losses, metrics


# --------------------------------------------------------------------------- batch helpers
def orpo_target_masks(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    nll_on_prompt: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a pair batch and return its shifted target masks.

    Args:
        input_ids: ``[2B, T]`` int token ids (rows ``0..B-1`` chosen, ``B..2B-1`` rejected).
        attention_mask: ``[2B, T]`` 0/1 (or bool), 1 on real tokens.
        completion_mask: ``[2B, T]`` 0/1 (or bool), 1 on completion tokens.
        nll_on_prompt: whether the NLL covers the chosen rows' prompt tokens.

    Returns:
        ``(logp_mask, nll_mask)``, both ``[2B, T-1]`` bool over **target** positions
        ``1..T-1`` (column ``j`` is the token at position ``j + 1``, predicted from the
        hidden state at ``j``): ``logp_mask`` = completion targets of every row;
        ``nll_mask`` = targets of the chosen rows (real tokens when ``nll_on_prompt``,
        completion tokens otherwise), False on the rejected rows.

    Raises:
        ValueError: wrong ranks/shapes, odd row count, ``T < 2``, a completion token on
            padding or at position 0, or a row without completion tokens (names the row).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [2B, T], got shape {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape or completion_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} and "
            f"completion_mask {tuple(completion_mask.shape)} must have the same [2B, T] shape"
        )
    n_rows, seq_len = input_ids.shape
    if n_rows == 0 or n_rows % 2:
        raise ValueError(f"a pair batch needs an even, non-zero number of rows (chosen then rejected), got {n_rows}")
    if seq_len < 2:
        raise ValueError(f"sequences need at least 2 positions to have a target, got T={seq_len}")
    attn = attention_mask.bool()
    comp = completion_mask.bool()
    if bool((comp & ~attn).any()):
        row = int((comp & ~attn).any(-1).nonzero()[0])
        raise ValueError(f"completion_mask is 1 on a padding position (attention_mask 0) in row {row}")
    if bool(comp[:, 0].any()):
        row = int(comp[:, 0].nonzero()[0])
        raise ValueError(f"completion_mask is 1 at position 0 in row {row}: the first token has no predecessor")
    logp_mask = comp[:, 1:]
    empty = ~logp_mask.any(-1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"row(s) {rows} of the pair batch have no completion token (completion_mask all 0)")
    half = n_rows // 2
    nll_mask = (attn[:, 1:] if nll_on_prompt else logp_mask).clone()
    nll_mask[half:] = False
    return logp_mask, nll_mask


def nll_token_count(
    attention_mask: torch.Tensor, completion_mask: torch.Tensor, nll_on_prompt: bool = True
) -> int:
    """Number of NLL target tokens of a ``[2B, T]`` pair batch (chosen rows, shifted).

    Sum this over the micro-batches of a gradient-accumulation window (and across
    processes) to get ``nll_denominator``; ``pair_denominator`` is the summed ``B``.
    """
    half = attention_mask.shape[0] // 2
    mask = attention_mask if nll_on_prompt else completion_mask
    return int(mask[:half, 1:].bool().sum())


def _orpo_from_token_logps(
    token_logps: torch.Tensor,
    token_logit_means: torch.Tensor,
    logp_mask: torch.Tensor,
    nll_mask: torch.Tensor,
    *,
    beta: float,
    alpha: float,
    nll_denominator: float | torch.Tensor | None,
    pair_denominator: float | torch.Tensor | None,
) -> ORPOLossOutput:
    """Shared tail of the unfused and fused losses.

    ``token_logps`` ``[2B, T-1]`` float32 target log-probs (values outside both masks are
    ignored; may be detached where the corresponding term has weight 0);
    ``token_logit_means`` ``[2B, T-1]`` float32 detached mean logit over the vocabulary.
    """
    _check_weights(beta, alpha, nll_denominator, pair_denominator)
    n_rows = token_logps.shape[0]
    half = n_rows // 2
    zero = token_logps.new_zeros(())

    counts = logp_mask.sum(-1).to(token_logps.dtype)
    seq_logps = torch.where(logp_mask, token_logps, zero).sum(-1) / counts
    if beta == 0:
        seq_logps = seq_logps.detach()
    chosen_logps, rejected_logps = seq_logps[:half], seq_logps[half:]

    nll_count = nll_mask.sum()
    nll_sum = -torch.where(nll_mask, token_logps, zero).sum()
    nll_local = (nll_sum / nll_count.clamp(min=1)).detach()

    or_losses, or_metrics = odds_ratio_loss(chosen_logps, rejected_logps, beta)
    loss = zero
    if alpha != 0:
        denom = nll_count.clamp(min=1) if nll_denominator is None else nll_denominator
        loss = loss + alpha * nll_sum / denom
    if beta != 0:
        denom = half if pair_denominator is None else pair_denominator
        loss = loss + or_losses.sum() / denom

    with torch.no_grad():
        means = token_logit_means.detach()
        comp_c, comp_r = logp_mask[:half], logp_mask[half:]
        metrics = {
            "rewards/chosen": or_metrics["rewards/chosen"],
            "rewards/rejected": or_metrics["rewards/rejected"],
            "rewards/accuracies": or_metrics["rewards/accuracies"],
            "rewards/margins": or_metrics["rewards/margins"],
            "logps/chosen": chosen_logps.detach().mean(),
            "logps/rejected": rejected_logps.detach().mean(),
            "logits/chosen": torch.where(comp_c, means[:half], zero).sum() / comp_c.sum(),
            "logits/rejected": torch.where(comp_r, means[half:], zero).sum() / comp_r.sum(),
            "nll_loss": nll_local,
            "log_odds_ratio": or_metrics["log_odds_ratio"],
            "log_odds_chosen": or_metrics["log_odds_chosen"],
        }
    return ORPOLossOutput(
        loss=loss, chosen_logps=chosen_logps, rejected_logps=rejected_logps, nll_loss=nll_local, metrics=metrics
    )


def check_rows(name: str, layout: str, x: torch.Tensor, input_ids: torch.Tensor) -> None:
    """Raise ValueError unless ``x`` is 3-D with its first two dims equal to ``input_ids``'s
    ``[2B, T]`` (``layout`` names the expected shape in the message, e.g. ``"[2B, T, V]"``)."""
    if x.dim() != 3 or x.shape[:2] != input_ids.shape:
        raise ValueError(
            f"{name} must be {layout} matching input_ids [2B, T]; got {tuple(x.shape)} and {tuple(input_ids.shape)}"
        )


def _check_weights(beta, alpha, nll_denominator, pair_denominator) -> None:
    if beta < 0 or alpha < 0:
        raise ValueError(f"beta and alpha must be >= 0, got beta={beta}, alpha={alpha}")
    if beta == 0 and alpha == 0:
        raise ValueError("alpha and beta cannot both be 0 (the loss would be constant)")
    for name, value in (("nll_denominator", nll_denominator), ("pair_denominator", pair_denominator)):
        if value is not None and float(value) <= 0:
            raise ValueError(f"{name} must be > 0 when given, got {float(value)}")


# --------------------------------------------------------------------------- full loss
def orpo_loss_from_logits(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    beta: float,
    alpha: float = 1.0,
    nll_on_prompt: bool = True,
    nll_denominator: float | torch.Tensor | None = None,
    pair_denominator: float | torch.Tensor | None = None,
) -> ORPOLossOutput:
    """Full ORPO loss and TRL metrics from materialised logits (paper eq. 6; TRL
    ``ORPOTrainer.concatenated_forward`` + ``get_batch_loss_metrics``).

    Args:
        logits: ``[2B, T, V]`` model output (any float dtype; log-softmax is computed in
            float32 one row at a time for low-precision logits).
        input_ids: ``[2B, T]`` int, rows ``0..B-1`` prompt+chosen, ``B..2B-1`` prompt+rejected,
            right padded.
        attention_mask: ``[2B, T]`` 1 on real tokens.
        completion_mask: ``[2B, T]`` 1 on completion tokens (aligned with ``input_ids``).
        beta: odds-ratio weight (paper's lambda); 0 = plain SFT (logps detached, metrics
            still reported).
        alpha: NLL weight; 0 = pure odds-ratio (NLL still reported).
        nll_on_prompt: NLL over the chosen rows' prompt tokens too (TRL/paper) or only
            their completion tokens.
        nll_denominator: total NLL target tokens over the gradient-accumulation window
            (all micro-batches, all processes; see :func:`nll_token_count`). None: this
            batch's count, i.e. a token mean.
        pair_denominator: total pairs over the window. None: this batch's ``B``.
            With both denominators set, ``loss = alpha * sum(token NLL) / nll_denominator
            + beta * sum(-logsigmoid(log_odds)) / pair_denominator``, so the losses (and
            gradients) of the micro-batches add up exactly to the full-batch ones. (Under
            DDP, which averages gradients over processes, multiply by the world size.)

    Returns:
        :class:`ORPOLossOutput`.

    Raises:
        ValueError: bad shapes/masks (see :func:`orpo_target_masks`), negative weights,
            both weights 0, or a non-positive denominator.
    """
    check_rows("logits", "[2B, T, V]", logits, input_ids)
    _check_weights(beta, alpha, nll_denominator, pair_denominator)
    logp_mask, nll_mask = orpo_target_masks(input_ids, attention_mask, completion_mask, nll_on_prompt)
    shifted = logits[:, :-1]
    token_logps = _token_logps(shifted, input_ids[:, 1:].long())
    with torch.no_grad():
        vocab = shifted.shape[-1]
        logit_means = shifted.sum(-1, dtype=token_logps.dtype) / vocab
    return _orpo_from_token_logps(token_logps, logit_means, logp_mask, nll_mask, beta=beta, alpha=alpha,
                                  nll_denominator=nll_denominator, pair_denominator=pair_denominator)

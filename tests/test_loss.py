"""ORPO loss on materialised logits: exact values, edge cases, TRL parity, gradient accumulation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from orpo_core.training.loss import (
    completion_logps,
    log1mexp,
    nll_token_count,
    odds_ratio_loss,
    orpo_loss_from_logits,
    orpo_target_masks,
)


# --------------------------------------------------------------------------- references (plain math)
def ref_log1mexp(x: float) -> float:
    return math.log(-math.expm1(x))


def ref_log_odds(lc: float, lr: float) -> float:
    return (lc - lr) - (ref_log1mexp(lc) - ref_log1mexp(lr))


def ref_or_term(lc: float, lr: float, beta: float) -> float:
    # beta * -log(sigmoid(z)) = beta * log(1 + exp(-z))
    return beta * math.log1p(math.exp(-ref_log_odds(lc, lr)))


def make_batch(B=2, T=9, V=13, prompt_lens=None, pad=None, seed=0):
    """A pair batch [2B, T] with per-row prompt lengths and right padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (2 * B, T), generator=g)
    attn = torch.ones(2 * B, T, dtype=torch.long)
    comp = torch.zeros(2 * B, T, dtype=torch.long)
    prompt_lens = prompt_lens or [3] * (2 * B)
    pad = pad or [0] * (2 * B)
    for r in range(2 * B):
        if pad[r]:
            attn[r, T - pad[r]:] = 0
            ids[r, T - pad[r]:] = 0
        comp[r, prompt_lens[r]:T - pad[r]] = 1
    return ids, attn, comp


# --------------------------------------------------------------------------- values
CHECKS = [  # (lc, lr, log_odds, beta=0.1 odds-ratio term) from the issue
    (-0.5, -1.5, 1.680270, 0.017086),
    (-1.0, -1.0, 0.0, 0.069315),
    (-2.0, -0.7, -1.840928, 0.198820),
]


@pytest.mark.parametrize("lc, lr, log_odds, term", CHECKS)
def test_odds_ratio_check_values(lc, lr, log_odds, term):
    losses, metrics = odds_ratio_loss(torch.tensor([lc]), torch.tensor([lr]), beta=0.1)
    # issue's figures (6 decimals) and exact math agree
    assert metrics["log_odds_chosen"].item() == pytest.approx(log_odds, abs=1e-5)
    assert losses.item() == pytest.approx(term, abs=1e-5)
    assert metrics["log_odds_chosen"].item() == pytest.approx(ref_log_odds(lc, lr), abs=1e-5)
    assert losses.item() == pytest.approx(ref_or_term(lc, lr, 0.1), abs=1e-6)
    assert metrics["log_odds_ratio"].item() == pytest.approx(-term / 0.1, abs=1e-4)


def test_odds_ratio_batch_metrics():
    lc = torch.tensor([-0.5, -1.0, -2.0])
    lr = torch.tensor([-1.5, -1.0, -0.7])
    losses, m = odds_ratio_loss(lc, lr, beta=0.25)
    expected = [ref_or_term(a, b, 0.25) for a, b in zip(lc.tolist(), lr.tolist())]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(0.25 * sum(lc.tolist()) / 3, abs=1e-6)
    assert m["rewards/margins"].item() == pytest.approx(0.25 * (lc - lr).mean().item(), abs=1e-6)
    assert m["rewards/accuracies"].item() == pytest.approx(1 / 3)  # only the first pair has lc > lr


def test_odds_ratio_near_certain_completion_is_finite():
    lc = torch.tensor([-1e-6], requires_grad=True)
    lr = torch.tensor([-30.0], requires_grad=True)
    losses, m = odds_ratio_loss(lc, lr, beta=0.1)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(lc.grad).all() and torch.isfinite(lr.grad).all()
    # log(1-exp(-1e-6)) ~ log(1e-6): log_odds ~ 29.999999 - (-13.8155 - log(1-e^-30))
    assert m["log_odds_chosen"].item() == pytest.approx(ref_log_odds(-1e-6, -30.0), rel=1e-5)
    # and the reverse, a completion with probability exactly 1 and one ~ 0
    for a, b in ((0.0, -1.0), (-30.0, 0.0), (0.0, 0.0), (-1e-9, -80.0)):
        x = torch.tensor([a], requires_grad=True)
        y = torch.tensor([b], requires_grad=True)
        losses, _ = odds_ratio_loss(x, y, beta=0.1)
        losses.sum().backward()
        assert torch.isfinite(losses).all(), (a, b)
        assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all(), (a, b)


def test_log1mexp_matches_math_on_both_branches_and_is_safe_at_zero():
    xs = [-80.0, -20.0, -3.0, -0.7, -0.6931, -0.5, -1e-3, -1e-6]
    got = log1mexp(torch.tensor(xs, dtype=torch.float64))
    assert got.tolist() == pytest.approx([ref_log1mexp(x) for x in xs], rel=1e-12)
    # float32 keeps relative accuracy near 0 (naive log(1 - exp(x)) would lose it)
    assert log1mexp(torch.tensor([-1e-6])).item() == pytest.approx(math.log(1e-6), rel=1e-5)
    x = torch.tensor([0.0, 1e-3, -1e-7], requires_grad=True)
    y = log1mexp(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    # gradient d/dx log(1-e^x) = -1/(e^{-x}-1) where not clamped
    x = torch.tensor([-2.0, -0.1], dtype=torch.float64, requires_grad=True)
    log1mexp(x).sum().backward()
    assert x.grad.tolist() == pytest.approx([-1 / math.expm1(2.0), -1 / math.expm1(0.1)], rel=1e-10)


# --------------------------------------------------------------------------- completion logps
def test_completion_logps_matches_log_softmax_reference():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 17, dtype=torch.float64)
    labels = torch.randint(0, 17, (3, 6))
    labels[:, :2] = -100
    labels[2, 5] = -100
    ref_tok = logits[:, :-1].log_softmax(-1)
    tgt = labels[:, 1:]
    mask = tgt != -100
    per = ref_tok.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    assert torch.allclose(completion_logps(logits, labels, average=False), per.sum(-1))
    assert torch.allclose(completion_logps(logits, labels), per.sum(-1) / mask.sum(-1))
    # bf16 logits go through the row-wise float32 path
    out = completion_logps(logits.to(torch.bfloat16), labels)
    assert out.dtype == torch.float32
    ref = completion_logps(logits.to(torch.bfloat16).double(), labels)
    assert torch.allclose(out.double(), ref, atol=1e-5)


def test_completion_logps_rejects_empty_rows_and_bad_shapes():
    logits = torch.randn(2, 4, 5)
    labels = torch.full((2, 4), -100)
    labels[0, 2] = 1
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        completion_logps(logits, labels)
    with pytest.raises(ValueError, match="labels"):
        completion_logps(logits, labels[:, :3])


# --------------------------------------------------------------------------- full loss
def test_orpo_loss_matches_independent_formula():
    torch.manual_seed(1)
    ids, attn, comp = make_batch(B=2, T=8, V=11, prompt_lens=[2, 3, 2, 4], pad=[0, 2, 1, 0])
    logits = torch.randn(4, 8, 11, dtype=torch.float64)
    out = orpo_loss_from_logits(logits, ids, attn, comp, beta=0.3, alpha=0.7)
    logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    cm, am = comp[:, 1:].bool(), attn[:, 1:].bool()
    avg = (logp * cm).sum(-1) / cm.sum(-1)
    nll = -(logp[:2] * am[:2]).sum() / am[:2].sum()
    terms = [ref_or_term(a, b, 0.3) for a, b in zip(avg[:2].tolist(), avg[2:].tolist())]
    assert out.loss.item() == pytest.approx(0.7 * nll.item() + sum(terms) / 2, rel=1e-10)
    assert out.nll_loss.item() == pytest.approx(nll.item(), rel=1e-10)
    assert out.chosen_logps.tolist() == pytest.approx(avg[:2].tolist(), rel=1e-10)
    assert out.rejected_logps.tolist() == pytest.approx(avg[2:].tolist(), rel=1e-10)
    # logits/* = mean logit over completion targets and vocabulary
    lm = logits[:, :-1].mean(-1)
    assert out.metrics["logits/chosen"].item() == pytest.approx((lm[:2] * cm[:2]).sum().item() / cm[:2].sum().item())
    assert out.metrics["logits/rejected"].item() == pytest.approx((lm[2:] * cm[2:]).sum().item() / cm[2:].sum().item())
    assert set(out.metrics) == {
        "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
        "logps/rejected", "logits/chosen", "logits/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen",
    }


def test_nll_on_prompt_differs_exactly_by_prompt_tokens():
    torch.manual_seed(2)
    ids, attn, comp = make_batch(B=2, T=10, V=9, prompt_lens=[4, 3, 2, 5], pad=[1, 0, 0, 2])
    logits = torch.randn(4, 10, 9, dtype=torch.float64)
    on = orpo_loss_from_logits(logits, ids, attn, comp, beta=0.0, alpha=1.0, nll_on_prompt=True)
    off = orpo_loss_from_logits(logits, ids, attn, comp, beta=0.0, alpha=1.0, nll_on_prompt=False)
    n_on, n_off = nll_token_count(attn, comp, True), nll_token_count(attn, comp, False)
    # prompt targets of the chosen rows: positions 1..prompt_len-1 (position 0 is never a target)
    assert (n_on, n_off) == (3 + 2 + 5 + 7, 5 + 7)
    prompt_ce = 0.0
    for r, p in ((0, 4), (1, 3)):
        prompt_ce += F.cross_entropy(logits[r, : p - 1], ids[r, 1:p], reduction="sum").item()
    assert on.loss.item() * n_on - off.loss.item() * n_off == pytest.approx(prompt_ce, rel=1e-10)
    assert on.nll_loss.item() == pytest.approx(on.loss.item())
    # beta = 0 is pure SFT but the odds-ratio metrics are still reported
    assert on.metrics["log_odds_chosen"].item() != 0.0
    assert not on.chosen_logps.requires_grad


def test_alpha_zero_is_pure_odds_ratio():
    torch.manual_seed(3)
    ids, attn, comp = make_batch(B=3, T=7, V=10)
    logits = torch.randn(6, 7, 10, requires_grad=True)
    out = orpo_loss_from_logits(logits, ids, attn, comp, beta=0.5, alpha=0.0)
    losses, _ = odds_ratio_loss(out.chosen_logps, out.rejected_logps, 0.5)
    assert out.loss.item() == pytest.approx(losses.mean().item(), rel=1e-6)
    assert out.nll_loss.item() > 0  # still reported
    out.loss.backward()
    # rows' prompt positions receive no gradient when the NLL is off
    assert logits.grad[:, :2].abs().max().item() == 0.0


def test_extreme_probabilities_give_finite_loss_and_grads():
    ids, attn, comp = make_batch(B=2, T=6, V=8, seed=4)
    base = torch.zeros(4, 6, 8)
    # chosen rows: every target has logit +60 -> completion probability ~1 (logps -> 0)
    # rejected rows: every target has logit -60 -> logps ~ -60 - log(7)
    for r in range(4):
        for t in range(5):
            base[r, t, ids[r, t + 1]] = 60.0 if r < 2 else -60.0
    logits = base.clone().requires_grad_(True)
    out = orpo_loss_from_logits(logits, ids, attn, comp, beta=0.1)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(logits.grad).all()
    assert out.chosen_logps.max().item() > -1e-6 and out.rejected_logps.max().item() < -60
    # and the other way round (chosen ~0 probability, rejected ~1)
    logits = (-base).requires_grad_(True)
    out = orpo_loss_from_logits(logits, ids, attn, comp, beta=0.1)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(logits.grad).all()
    assert out.metrics["rewards/accuracies"].item() == 0.0


def test_gradient_accumulation_with_denominators_is_exact():
    torch.manual_seed(5)
    B, T, H, V = 2, 9, 6, 15
    ids, attn, comp = make_batch(B=B, T=T, V=V, prompt_lens=[3, 4, 2, 3], pad=[2, 0, 1, 3], seed=5)
    head = torch.nn.Linear(H, V)
    hidden = torch.randn(2 * B, T, H)

    def run(rows, **kw):
        head.zero_grad()
        out = orpo_loss_from_logits(head(hidden[rows]), ids[rows], attn[rows], comp[rows], beta=0.2, **kw)
        out.loss.backward()
        return out.loss.detach(), head.weight.grad.clone(), head.bias.grad.clone()

    full_loss, full_gw, full_gb = run([0, 1, 2, 3])
    n_nll = nll_token_count(attn, comp)
    parts = [run([i, i + B], nll_denominator=n_nll, pair_denominator=B) for i in range(B)]
    assert sum(p[0] for p in parts).item() == pytest.approx(full_loss.item(), rel=1e-6)
    assert torch.allclose(sum(p[1] for p in parts), full_gw, rtol=1e-5, atol=1e-7)
    assert torch.allclose(sum(p[2] for p in parts), full_gb, rtol=1e-5, atol=1e-7)
    # without denominators the micro-batch means do not add up (different NLL token counts)
    naive = [run([i, i + B])[0] for i in range(B)]
    assert abs(sum(naive).item() / B - full_loss.item()) > 1e-4


def test_bad_batches_raise_clear_errors():
    ids, attn, comp = make_batch(B=1, T=6, V=7)
    logits = torch.randn(2, 6, 7)
    bad = comp.clone()
    bad[1] = 0
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        orpo_loss_from_logits(logits, ids, attn, bad, beta=0.1)
    bad = comp.clone()
    bad[0, 0] = 1
    with pytest.raises(ValueError, match="position 0 in row 0"):
        orpo_loss_from_logits(logits, ids, attn, bad, beta=0.1)
    bad_attn = attn.clone()
    bad_attn[1, -1] = 0
    with pytest.raises(ValueError, match="padding position .* row 1"):
        orpo_loss_from_logits(logits, ids, bad_attn, comp, beta=0.1)
    with pytest.raises(ValueError, match="even"):
        orpo_target_masks(ids[:1], attn[:1], comp[:1])
    with pytest.raises(ValueError, match="both be 0"):
        orpo_loss_from_logits(logits, ids, attn, comp, beta=0.0, alpha=0.0)
    with pytest.raises(ValueError, match="nll_denominator"):
        orpo_loss_from_logits(logits, ids, attn, comp, beta=0.1, nll_denominator=0)


# --------------------------------------------------------------------------- TRL parity
def _trl_stub(beta):
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    T = orpo.ORPOTrainer
    stub = SimpleNamespace(
        beta=beta,
        is_encoder_decoder=False,
        padding_value=0,
        aux_loss_enabled=False,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
        concatenated_inputs=T.concatenated_inputs,
        get_batch_logps=T.get_batch_logps,
    )
    stub.concatenated_forward = lambda model, batch: T.concatenated_forward(stub, model, batch)
    stub.odds_ratio_loss = lambda c, r: T.odds_ratio_loss(stub, c, r)
    return T, stub


def test_matches_trl_orpo_trainer():
    beta = 0.2
    T_cls, stub = _trl_stub(beta)
    torch.manual_seed(6)
    B, T, V, H = 3, 10, 23, 8
    ids, attn, comp = make_batch(B=B, T=T, V=V, prompt_lens=[3, 4, 2, 3, 4, 2], pad=[0, 2, 1, 1, 0, 3], seed=6)
    emb = torch.nn.Embedding(V, H)
    head = torch.nn.Linear(H, V)

    def model(input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=head(torch.tanh(emb(input_ids))))

    labels = torch.where(comp.bool(), ids, -100)
    batch = {
        "chosen_input_ids": ids[:B], "chosen_attention_mask": attn[:B], "chosen_labels": labels[:B],
        "rejected_input_ids": ids[B:], "rejected_attention_mask": attn[B:], "rejected_labels": labels[B:],
    }
    trl_loss, trl_metrics = T_cls.get_batch_loss_metrics(stub, model, batch)
    trl_grads = torch.autograd.grad(trl_loss, [head.weight, emb.weight])

    out = orpo_loss_from_logits(model(ids).logits, ids, attn, comp, beta=beta)
    ours = torch.autograd.grad(out.loss, [head.weight, emb.weight])
    assert out.loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    for a, b in zip(ours, trl_grads):
        assert torch.allclose(a, b, atol=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"):
        assert out.metrics[key].item() == pytest.approx(trl_metrics[key], abs=1e-6), key
    # TRL's per-sequence logps convention (average over labelled tokens, shifted)
    trl_logps = T_cls.get_batch_logps(model(ids).logits, labels, average_log_prob=True)
    assert torch.allclose(completion_logps(model(ids).logits, labels), trl_logps, atol=1e-6)

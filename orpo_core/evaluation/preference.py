"""Held-out preference metrics: accuracy, reward margin, log-odds (with bootstrap CIs).

Each held-out pair is scored exactly as the ORPO loss scores it during training
(``orpo_core.training.loss``; TRL ``ORPOTrainer.concatenated_forward``): one ``[2B, T]``
batch, rows ``0..B-1`` prompt+chosen and ``B..2B-1`` prompt+rejected, right
padded; the log-probability of a completion is the **mean** per-token
log-probability of its tokens (``average_log_prob=True``), prompt and padding
excluded. From the per-pair ``lc``/``lr`` (chosen/rejected average log-probs):

* ``preference/accuracy`` = mean(``lc > lr``)  (TRL ``rewards/accuracies``);
* ``preference/margin``   = mean(``beta * (lc - lr)``)  (TRL ``rewards/margins``);
* ``preference/log_odds`` = mean(``(lc - lr) - (log1mexp(lc) - log1mexp(lr))``)
  (paper eq. 7 / TRL ``log_odds_chosen``);
* ``perplexity/chosen``   = ``exp(sum NLL / sum tokens)`` over the chosen
  completion tokens (token-weighted, the same forward pass).

Confidence intervals are percentile bootstrap intervals over pairs (resampling
pairs with replacement, ``eval.bootstrap_samples`` resamples, seeded).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .inputs import read_parquet_table
from .errors import EvalInputError

PAIR_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")


@dataclass
class Pair:
    """One tokenized held-out pair (token id lists; completions include the end-of-turn token)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def load_pairs(path: str | Path, max_pairs: int | None = None) -> list[Pair]:
    """Read ``tokenized/test.parquet`` (contract section 2) into :class:`Pair` objects.

    Args:
        path: the parquet file.
        max_pairs: keep the first ``max_pairs`` rows (deterministic).

    Raises:
        EvalInputError: missing file, missing column, or a row whose prompt, chosen or
            rejected ids are empty/null or not integer lists (names file, row, field).
    """
    path = Path(path)
    table = read_parquet_table(path)
    missing = [c for c in PAIR_COLUMNS if c not in table.column_names]
    if missing:
        raise EvalInputError(f"{path}: missing column(s) {missing} (have {table.column_names})")
    if max_pairs is not None:
        table = table.slice(0, max_pairs)
    cols = {c: table.column(c).to_pylist() for c in PAIR_COLUMNS}
    pairs = []
    for i in range(table.num_rows):
        vals = {}
        for c in PAIR_COLUMNS:
            v = cols[c][i]
            if not v:
                raise EvalInputError(f"{path}: row {i}, field {c!r} is empty or null")
            if not all(isinstance(t, int) and t >= 0 for t in v):
                raise EvalInputError(f"{path}: row {i}, field {c!r} holds values that are not token ids")
            vals[c] = v
        pairs.append(Pair(vals["prompt_input_ids"], vals["chosen_input_ids"], vals["rejected_input_ids"]))
    return pairs


@dataclass
class PairScores:
    """Per-pair log-probability sums and token counts (numpy, length N, input order).

    ``*_logp_sum`` float64 (nats, <= 0), ``*_tokens`` int64 (completion target tokens).
    """

    chosen_logp_sum: np.ndarray
    chosen_tokens: np.ndarray
    rejected_logp_sum: np.ndarray
    rejected_tokens: np.ndarray

    @property
    def chosen_logps(self) -> np.ndarray:
        """Average per-token log-prob of each chosen completion, float64 [N]."""
        return self.chosen_logp_sum / self.chosen_tokens

    @property
    def rejected_logps(self) -> np.ndarray:
        """Average per-token log-prob of each rejected completion, float64 [N]."""
        return self.rejected_logp_sum / self.rejected_tokens

    def __len__(self) -> int:
        return len(self.chosen_tokens)


def build_pair_batch(pairs: Sequence[Pair], pad_token_id: int):
    """Collate pairs into the ORPO ``[2B, T]`` layout.

    Returns:
        ``(input_ids, attention_mask, labels)``, each ``[2B, T]`` int64; ``labels`` equals
        ``input_ids`` on completion tokens and -100 on prompt and padding (unshifted).
    """
    import torch

    seqs = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    width = max(len(a) + len(b) for a, b in seqs)
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (prompt, completion) in enumerate(seqs):
        ids = torch.tensor(prompt + completion, dtype=torch.long)
        input_ids[i, : len(ids)] = ids
        attention_mask[i, : len(ids)] = 1
        labels[i, len(prompt) : len(ids)] = ids[len(prompt) :]
    return input_ids, attention_mask, labels


def score_pairs(model, pairs: Sequence[Pair], *, pad_token_id: int, batch_size: int = 8, device=None) -> PairScores:
    """Sum of completion log-probs and token counts of every chosen and rejected completion.

    Runs ``model`` in eval mode under ``torch.inference_mode`` on batches of
    ``batch_size`` pairs (sorted by length to limit padding; results are returned in
    input order). Log-probs come from :func:`orpo_core.training.loss.completion_logps`
    (``average=False``), i.e. ``log_softmax(logits[t-1])[token_t]`` summed over the
    completion positions, in float32.

    Args:
        model: a causal LM returning ``.logits`` ``[2B, T, V]``.
        pairs: held-out pairs.
        pad_token_id: id used for right padding (masked out).
        batch_size: pairs per forward pass (``2 * batch_size`` rows).
        device: where to put the batch (default: the model's device).

    Returns:
        :class:`PairScores`.
    """
    import torch

    from orpo_core.training.loss import completion_logps

    n = len(pairs)
    out = np.zeros((4, n), dtype=np.float64)
    if n == 0:
        return PairScores(out[0], out[1].astype(np.int64), out[2], out[3].astype(np.int64))
    device = device or next(model.parameters()).device
    order = sorted(range(n), key=lambda i: -(len(pairs[i].prompt) + max(len(pairs[i].chosen), len(pairs[i].rejected))))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                b = len(idx)
                input_ids, attention_mask, labels = build_pair_batch([pairs[i] for i in idx], pad_token_id)
                logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
                sums = completion_logps(logits, labels.to(device), average=False).double().cpu().numpy()
                counts = (labels[:, 1:] != -100).sum(-1).numpy()
                out[0, idx], out[1, idx] = sums[:b], counts[:b]
                out[2, idx], out[3, idx] = sums[b:], counts[b:]
                del logits
    finally:
        model.train(was_training)
    return PairScores(out[0], out[1].astype(np.int64), out[2], out[3].astype(np.int64))


# --------------------------------------------------------------------------- statistics
def log1mexp_np(x: np.ndarray) -> np.ndarray:
    """``log(1 - exp(x))`` for ``x <= 0`` with the same clamp and branches as
    :func:`orpo_core.training.loss.log1mexp` (float64)."""
    import torch

    from orpo_core.training.loss import log1mexp

    return log1mexp(torch.as_tensor(np.asarray(x, dtype=np.float64))).numpy()


def log_odds(chosen_logps: np.ndarray, rejected_logps: np.ndarray) -> np.ndarray:
    """Per-pair ORPO log odds ratio ``(lc - lr) - (log1mexp(lc) - log1mexp(lr))``
    (paper eq. 7; TRL ``ORPOTrainer.odds_ratio_loss``), float64 [N]."""
    lc = np.asarray(chosen_logps, dtype=np.float64)
    lr = np.asarray(rejected_logps, dtype=np.float64)
    return (lc - lr) - (log1mexp_np(lc) - log1mexp_np(lr))


def bootstrap_ci(
    statistic: Callable[[np.ndarray], np.ndarray],
    n: int,
    *,
    samples: int,
    seed: int,
    level: float = 0.95,
    chunk: int = 200,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of a statistic over ``n`` items.

    Args:
        statistic: maps an index array ``[R, n]`` (each row a resample of ``range(n)``
            with replacement) to ``[R]`` statistic values.
        n: number of items.
        samples: number of resamples R (0: no interval).
        seed: seed of the numpy ``default_rng`` drawing the resamples.
        level: coverage (0.95: the 2.5th and 97.5th percentiles).

    Returns:
        ``(low, high)`` or None when ``samples == 0`` or ``n < 2``.
    """
    if samples <= 0 or n < 2:
        return None
    rng = np.random.default_rng(seed)
    values = []
    for start in range(0, samples, chunk):
        r = min(chunk, samples - start)
        values.append(np.asarray(statistic(rng.integers(0, n, size=(r, n))), dtype=np.float64))
    v = np.concatenate(values)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(v, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _metric(value: float, n: int, ci: tuple[float, float] | None, **extra: Any) -> dict[str, Any]:
    d = {"value": float(value), "n": int(n), "ci95": list(ci) if ci is not None else None}
    d.update(extra)
    return d


def preference_metrics(scores: PairScores, *, beta: float, bootstrap_samples: int, seed: int) -> dict[str, dict]:
    """Preference and chosen-perplexity metrics from :class:`PairScores`.

    Args:
        scores: per-pair sums and counts.
        beta: ORPO ``beta`` (the reward scale of ``preference/margin``, as TRL).
        bootstrap_samples: resamples for the 95% intervals (0: none).
        seed: bootstrap seed (every metric uses the same resamples).

    Returns:
        ``{key: {"value", "n", "ci95", ...}}`` for ``preference/accuracy``,
        ``preference/margin``, ``preference/log_odds``, ``preference/logps_chosen``,
        ``preference/logps_rejected`` and ``perplexity/chosen`` (with ``tokens``).
        Empty when there are no pairs.
    """
    n = len(scores)
    if n == 0:
        return {}
    lc, lr = scores.chosen_logps, scores.rejected_logps
    win = (lc > lr).astype(np.float64)
    margin = beta * (lc - lr)
    lo = log_odds(lc, lr)
    nll, tok = -scores.chosen_logp_sum, scores.chosen_tokens.astype(np.float64)

    def boot(fn):
        return bootstrap_ci(fn, n, samples=bootstrap_samples, seed=seed)

    return {
        "preference/accuracy": _metric(win.mean(), n, boot(lambda idx: win[idx].mean(1))),
        "preference/margin": _metric(margin.mean(), n, boot(lambda idx: margin[idx].mean(1)), beta=beta),
        "preference/log_odds": _metric(lo.mean(), n, boot(lambda idx: lo[idx].mean(1))),
        "preference/logps_chosen": _metric(lc.mean(), n, boot(lambda idx: lc[idx].mean(1))),
        "preference/logps_rejected": _metric(lr.mean(), n, boot(lambda idx: lr[idx].mean(1))),
        "perplexity/chosen": _metric(
            float(np.exp(nll.sum() / tok.sum())),
            n,
            boot(lambda idx: np.exp(nll[idx].sum(1) / tok[idx].sum(1))),
            tokens=int(tok.sum()),
        ),
    }


def paired_deltas(
    trained: PairScores, base: PairScores, *, beta: float, bootstrap_samples: int, seed: int
) -> dict[str, dict]:
    """Trained-minus-base differences on the same pairs, with paired bootstrap 95% CIs
    (each resample draws the same pairs for both models).

    Returns:
        ``{key: {"value", "n", "ci95"}}`` for ``preference/accuracy``, ``preference/margin``,
        ``preference/log_odds`` and ``perplexity/chosen``; empty when the pair sets differ
        in size or are empty.
    """
    n = len(trained)
    if n == 0 or len(base) != n:
        return {}

    def per_pair(s: PairScores):
        lc, lr = s.chosen_logps, s.rejected_logps
        return (lc > lr).astype(np.float64), beta * (lc - lr), log_odds(lc, lr), -s.chosen_logp_sum

    tw, tm, tl, tn = per_pair(trained)
    bw, bm, bl, bn = per_pair(base)
    tok_t, tok_b = trained.chosen_tokens.astype(np.float64), base.chosen_tokens.astype(np.float64)
    dw, dm, dl = tw - bw, tm - bm, tl - bl

    def boot(fn):
        return bootstrap_ci(fn, n, samples=bootstrap_samples, seed=seed)

    ppl_delta = float(np.exp(tn.sum() / tok_t.sum()) - np.exp(bn.sum() / tok_b.sum()))
    return {
        "preference/accuracy": _metric(dw.mean(), n, boot(lambda i: dw[i].mean(1))),
        "preference/margin": _metric(dm.mean(), n, boot(lambda i: dm[i].mean(1))),
        "preference/log_odds": _metric(dl.mean(), n, boot(lambda i: dl[i].mean(1))),
        "perplexity/chosen": _metric(
            ppl_delta,
            n,
            boot(lambda i: np.exp(tn[i].sum(1) / tok_t[i].sum(1)) - np.exp(bn[i].sum(1) / tok_b[i].sum(1))),
        ),
    }

"""Rated completions -> (chosen, rejected) pairs.

One prompt with several completions, each with a score (UltraFeedback's
``overall_score`` or the mean of its fine-grained aspect ratings, or a generic
``scores`` list), becomes preference pairs by one of three seeded strategies:

* ``best_vs_worst``: highest score as chosen, lowest as rejected (one pair per row).
* ``best_vs_random``: highest score as chosen, a uniformly random one of the
  remaining completions as rejected; the Zephyr recipe (Tunstall et al. 2023,
  "Zephyr: Direct Distillation of LM Alignment", sec. 3, used to build
  HuggingFaceH4/ultrafeedback_binarized). Completions tied with the best are
  not candidates (they would be ties).
* ``all_pairs``: every pair whose score gap is larger than ``margin``.

In every strategy a pair needs ``score(chosen) - score(rejected) > margin``
(``margin`` defaults to 0, so ties never form a pair). Rows that yield no pair
are dropped with reason ``tie`` (all scores equal) or ``below_margin``; tied and
below-margin pairs skipped inside ``all_pairs`` rows are counted separately.
When several completions share the best (or worst) score the first one in row
order is taken, so results depend only on the data and the seed.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Sequence

from orpo_core.data.errors import DropRow

TIE = "tie"
BELOW_MARGIN = "below_margin"
UNSCORED = "unscored"


def select_pairs(
    scores: Sequence[float | None],
    strategy: str,
    margin: float = 0.0,
    rng: random.Random | None = None,
    counters: Counter | None = None,
) -> list[tuple[int, int]]:
    """Choose (chosen index, rejected index) pairs among scored completions.

    Args:
        scores: one score per completion (None = unscored, never paired).
        strategy: ``best_vs_worst`` | ``best_vs_random`` | ``all_pairs``.
        margin: minimum score gap, exclusive (``gap > margin``).
        rng: seeded generator for ``best_vs_random`` (required for it).
        counters: optional Counter receiving ``tied_pairs_skipped`` and
            ``below_margin_pairs_skipped`` for ``all_pairs``.

    Returns:
        list of index pairs (at least one).

    Raises:
        DropRow: ``unscored`` (fewer than two scored completions), ``tie`` (all
            scored completions equal), ``below_margin`` (no gap above margin).
        ValueError: unknown strategy, or ``best_vs_random`` without ``rng``.
    """
    scored = [(i, float(s)) for i, s in enumerate(scores) if s is not None]
    if len(scored) < 2:
        raise DropRow(UNSCORED, f"{len(scored)} scored completion(s), need 2")
    values = [s for _, s in scored]
    if max(values) == min(values):
        raise DropRow(TIE, f"all {len(scored)} completions scored {values[0]}")

    if strategy == "all_pairs":
        out = []
        ties = below = 0
        for a in range(len(scored)):
            for b in range(a + 1, len(scored)):
                (i, si), (j, sj) = scored[a], scored[b]
                gap = abs(si - sj)
                if gap == 0:
                    ties += 1
                elif gap <= margin:
                    below += 1
                else:
                    out.append((i, j) if si > sj else (j, i))
        if counters is not None:
            counters["tied_pairs_skipped"] += ties
            counters["below_margin_pairs_skipped"] += below
        if not out:
            raise DropRow(BELOW_MARGIN, f"no score gap above {margin}")
        return out

    best_i, best_s = max(scored, key=lambda t: t[1])  # max/min return the first of equals
    if strategy == "best_vs_worst":
        worst_i, worst_s = min(scored, key=lambda t: t[1])
        if best_s - worst_s <= margin:
            raise DropRow(BELOW_MARGIN, f"best-worst gap {best_s - worst_s} <= {margin}")
        return [(best_i, worst_i)]
    if strategy == "best_vs_random":
        if rng is None:
            raise ValueError("best_vs_random needs a seeded rng")
        candidates = [i for i, s in scored if best_s - s > margin]
        if not candidates:
            raise DropRow(BELOW_MARGIN, f"no completion more than {margin} below the best")
        return [(best_i, rng.choice(candidates))]
    raise ValueError(f"unknown binarize strategy {strategy!r}")

"""A seeded, learnable preference dataset the project generates itself.

Used by ``recipes/quickstart.yaml`` so the main job needs no network. Every row
is a short task with a correct (chosen) and a wrong (rejected) answer whose
errors are systematic, so even a tiny random-init model trained for a few
minutes on CPU learns to rank chosen above rejected on held-out prompts:

* ``add``:      "What is 3 + 5?"            -> "3 + 5 = 8."   vs  "3 + 5 = 9."
* ``compare``:  "Which is larger: 41 or 17?" -> "41."         vs  "17."
* ``upper``:    "Write in capitals: cat sun" -> "CAT SUN"      vs  "cat sun"
* ``count``:    "Count to 4."               -> "1 2 3 4"      vs  "1 2 4 3"

Rows come out already in the normalized schema (see ``orpo_core.data``):
``prompt`` = [user message], ``chosen``/``rejected`` = [assistant message].
"""

from __future__ import annotations

import random
from typing import Any

WORDS = (
    "cat dog sun moon tree fish bird star rain snow blue red green gold ship road "
    "lamp book door wind fire stone milk rice salt leaf"
).split()


def _add(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    wrong = a + b + rng.choice([-2, -1, 1, 2])
    if wrong < 0:
        wrong = a + b + 1
    return f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", f"{a} + {b} = {wrong}."


def _compare(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.sample(range(10, 100), 2)
    hi, lo = max(a, b), min(a, b)
    return f"Which is larger: {a} or {b}?", f"{hi}.", f"{lo}."


def _upper(rng: random.Random) -> tuple[str, str, str]:
    words = " ".join(rng.sample(WORDS, rng.randint(1, 3)))
    return f"Write in capitals: {words}", words.upper(), words


def _count(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(3, 9)
    seq = [str(i) for i in range(1, n + 1)]
    bad = seq[:]
    i = rng.randrange(1, n - 1)
    bad[i], bad[i + 1] = bad[i + 1], bad[i]
    return f"Count to {n}.", " ".join(seq), " ".join(bad)


TASKS = {"add": _add, "compare": _compare, "upper": _upper, "count": _count}


def generate_arithmetic(n_rows: int, seed: int = 0) -> list[dict[str, Any]]:
    """Generate ``n_rows`` normalized preference rows, deterministically from ``seed``.

    Returns:
        list of dicts with keys ``prompt``, ``chosen``, ``rejected`` (message
        lists), ``source`` (``"synthetic:arithmetic/<task>"``), ``score_chosen``
        (1.0) and ``score_rejected`` (0.0). Rows may repeat (small task space);
        the cleaning step de-duplicates them.
    """
    rng = random.Random(seed)
    names = sorted(TASKS)
    rows = []
    for i in range(n_rows):
        task = names[i % len(names)]
        prompt, good, bad = TASKS[task](rng)
        rows.append(
            {
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": bad}],
                "source": f"synthetic:arithmetic/{task}",
                "score_chosen": 1.0,
                "score_rejected": 0.0,
            }
        )
    return rows

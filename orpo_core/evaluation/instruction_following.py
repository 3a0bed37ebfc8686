"""Instruction following on held-out prompts with verifiable constraints (IFEval-style).

The held-out prompts are the rows of the prepared ``data/test.parquet`` that carry a
``constraints`` column (the ``instructions`` synthetic source; see
:mod:`orpo_core.data.synthetic.instructions`). Each model answers every prompt greedily (chat
template applied, batched, left padded, ``eval.max_new_tokens``), and each answer is
checked by the shared verifiers with IFEval's strict semantics (the raw answer).

Metrics (IFEval's definitions under the project's own names; the ``ifeval`` names are kept for
Google's prompt set scored by lm-eval, ``lm_eval/ifeval_dev/...``, see :mod:`.lm_eval_paired`):

* ``instructions/prompt_level_strict_acc`` = mean over prompts of ``all(instructions followed)``;
* ``instructions/inst_level_strict_acc``   = followed instructions / all instructions
  (pooled over prompts, lm-eval's ``agg_inst_level_acc``).

95 % CIs are percentile bootstrap intervals resampling prompts (for the instruction
level too: the instructions of one prompt are not independent). The delta
trained − base uses a paired bootstrap: each resample draws the same prompts for both
models (:func:`orpo_core.evaluation.preference.bootstrap_ci`, same seed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from orpo_core.data.synthetic.instructions.verifiers import ConstraintError, Verifier, check_all, from_json

from .inputs import read_parquet_table
from .errors import EvalInputError
from .preference import bootstrap_ci

PROMPT_LEVEL = "instructions/prompt_level_strict_acc"
INST_LEVEL = "instructions/inst_level_strict_acc"
METRICS = (PROMPT_LEVEL, INST_LEVEL)


@dataclass
class InstructionPrompt:
    """A held-out prompt: its messages (ending with the user turn), its verifiers and its origin."""

    messages: list[dict[str, str]]
    verifiers: list[Verifier]
    origin: str = ""

    @property
    def text(self) -> str:
        """The last user message (what is displayed)."""
        return self.messages[-1]["content"]


@dataclass
class FollowResult:
    """Per-prompt verdicts of one model: ``follow[i][j]`` = prompt i's instruction j followed."""

    responses: list[str]
    follow: list[list[bool]] = field(default_factory=list)

    def prompt_level(self) -> np.ndarray:
        """float64 [N]: 1.0 where every instruction of the prompt is followed."""
        return np.array([float(all(f)) for f in self.follow], dtype=np.float64)

    def counts(self) -> tuple[np.ndarray, np.ndarray]:
        """(followed instructions, instructions) per prompt, float64 [N] each."""
        return (
            np.array([float(sum(f)) for f in self.follow], dtype=np.float64),
            np.array([float(len(f)) for f in self.follow], dtype=np.float64),
        )


def load_instruction_prompts(path: str | Path, max_prompts: int | None = None) -> list[InstructionPrompt]:
    """Rows with a non-null ``constraints`` column of a normalized pair file (``data/test.parquet``),
    except the on-policy rows (``source`` starting with ``onpolicy:``, :mod:`orpo_core.data.onpolicy`).

    Args:
        path: the Parquet file (:data:`orpo_core.data.schema.PAIR_SCHEMA`; files written
            before the ``constraints`` column existed simply yield no prompts).
        max_prompts: keep the first ``max_prompts`` such rows (deterministic).

    Raises:
        EvalInputError: missing/unreadable file, or a row whose ``constraints`` is not a
            valid constraint list (naming file, row and the problem).
    """
    path = Path(path)
    table = read_parquet_table(path)
    if "constraints" not in table.column_names:
        return []
    for col in ("prompt",):
        if col not in table.column_names:
            raise EvalInputError(f"{path}: missing column {col!r} (have {table.column_names})")
    constraints = table.column("constraints").to_pylist()
    # on-policy rows carry IFEval's ids and kwargs (checked by lm-eval when they were made): the project's
    # own held-out metric is the generator's held-out split, so they are not part of it
    sources = table.column("source").to_pylist() if "source" in table.column_names else [None] * table.num_rows
    constraints = [None if str(src or "").startswith("onpolicy:") else c for c, src in zip(constraints, sources)]
    prompts = table.column("prompt").to_pylist()
    origins = table.column("origin").to_pylist() if "origin" in table.column_names else [None] * table.num_rows
    out: list[InstructionPrompt] = []
    for i, c in enumerate(constraints):
        if c is None:
            continue
        if max_prompts is not None and len(out) >= max_prompts:
            break
        try:
            verifiers = from_json(c)
        except ConstraintError as e:
            raise EvalInputError(f"{path}: row {i}, field 'constraints': {e}") from None
        msgs = prompts[i]
        if not verifiers or not msgs or msgs[-1].get("role") != "user":
            raise EvalInputError(f"{path}: row {i}: a constraint row needs constraints and a prompt ending with a user turn")
        out.append(InstructionPrompt([{"role": m["role"], "content": m["content"]} for m in msgs], verifiers, origins[i] or f"row {i}"))
    return out


def prompts_from_rows(rows: list[dict[str, Any]], max_prompts: int | None = None) -> list[InstructionPrompt]:
    """:class:`InstructionPrompt` objects from generator rows (``orpo_core.data.synthetic.instructions.generate_instructions``)."""
    out = []
    for i, r in enumerate(rows[:max_prompts] if max_prompts else rows):
        out.append(InstructionPrompt(list(r["prompt"]), from_json(r["constraints"]), r.get("origin") or f"generated row {i}"))
    return out


def prompt_ids(tokenizer, prompt: InstructionPrompt) -> list[int]:
    """Token ids of the prompt's messages through the tokenizer's chat template, with the generation prompt."""
    enc = tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = enc["input_ids"]
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return list(ids)


def answer_and_score(
    model, tokenizer, prompts: list[InstructionPrompt], *, max_new_tokens: int, batch_size: int
) -> FollowResult:
    """Greedy answers (:func:`.generation.generate_batched`) checked by each prompt's verifiers."""
    from .generation import generate_batched

    ids = [prompt_ids(tokenizer, p) for p in prompts]
    responses = generate_batched(model, tokenizer, ids, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return score_responses(prompts, responses)


def score_responses(prompts: list[InstructionPrompt], responses: list[str]) -> FollowResult:
    """Check ``responses[i]`` against ``prompts[i]``'s verifiers (IFEval strict).

    Raises:
        ValueError: different numbers of prompts and responses.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return FollowResult(list(responses), [check_all(r, p.verifiers) for p, r in zip(prompts, responses)])


def _metric(value: float, n: int, ci: tuple[float, float] | None, **extra: Any) -> dict[str, Any]:
    return {"value": float(value), "n": int(n), "ci95": list(ci) if ci is not None else None, **extra}


def instruction_metrics(result: FollowResult, *, bootstrap_samples: int, seed: int) -> dict[str, dict[str, Any]]:
    """Prompt- and instruction-level strict accuracy with 95 % bootstrap CIs over prompts.

    Returns:
        ``{PROMPT_LEVEL: {"value", "n" (prompts), "ci95"}, INST_LEVEL: {..., "instructions"}}``;
        empty when there are no prompts.
    """
    n = len(result.follow)
    if n == 0:
        return {}
    pl = result.prompt_level()
    k, m = result.counts()

    def boot(fn):
        return bootstrap_ci(fn, n, samples=bootstrap_samples, seed=seed)

    return {
        PROMPT_LEVEL: _metric(pl.mean(), n, boot(lambda idx: pl[idx].mean(1))),
        INST_LEVEL: _metric(k.sum() / m.sum(), n, boot(lambda idx: k[idx].sum(1) / m[idx].sum(1)), instructions=int(m.sum())),
    }


def paired_instruction_deltas(
    trained: FollowResult, base: FollowResult, *, bootstrap_samples: int, seed: int
) -> dict[str, dict[str, Any]]:
    """trained − base on the same prompts, with paired bootstrap 95 % CIs (same resampled prompts).

    Returns:
        ``{PROMPT_LEVEL: {"value", "n", "ci95", "wins", "losses"}, INST_LEVEL: {...}}``
        (``wins``: prompts only the trained model follows fully; ``losses``: only the base);
        empty when the prompt sets differ in size or are empty.
    """
    n = len(trained.follow)
    if n == 0 or len(base.follow) != n:
        return {}
    if any(len(a) != len(b) for a, b in zip(trained.follow, base.follow)):
        return {}
    tp, bp = trained.prompt_level(), base.prompt_level()
    tk, m = trained.counts()
    bk, _ = base.counts()
    d = tp - bp

    def boot(fn):
        return bootstrap_ci(fn, n, samples=bootstrap_samples, seed=seed)

    return {
        PROMPT_LEVEL: _metric(
            d.mean(), n, boot(lambda i: d[i].mean(1)), wins=int((d > 0).sum()), losses=int((d < 0).sum())
        ),
        INST_LEVEL: _metric(
            tk.sum() / m.sum() - bk.sum() / m.sum(), n, boot(lambda i: (tk[i].sum(1) - bk[i].sum(1)) / m[i].sum(1))
        ),
    }


def side_by_side(
    prompts: list[InstructionPrompt], results: dict[str, FollowResult], k: int
) -> list[dict[str, Any]]:
    """Up to ``k`` examples for the report: prompts where the models disagree first
    (in prompt order), then the rest. Each: ``prompt``, ``origin``, ``constraints``
    (ids) and per model ``{"answer", "follow" (list of bools)}``."""
    if k <= 0 or not prompts:
        return []
    labels = list(results)
    order = disagreement_order({lb: results[lb].follow for lb in labels})
    out = []
    for i in order[:k]:
        ex: dict[str, Any] = {
            "prompt": prompts[i].text,
            "origin": prompts[i].origin,
            "constraints": [v.to_dict() for v in prompts[i].verifiers],
        }
        for lb in labels:
            ex[lb] = {"answer": results[lb].responses[i], "follow": list(results[lb].follow[i])}
        out.append(ex)
    return out


def disagreement_order(follows: dict[str, list[list[bool]]]) -> list[int]:
    """Prompt indices, those where the models' verdicts differ first (each group in prompt order).

    Args:
        follows: per model label, ``follow[i][j]`` = prompt i's instruction j followed (same length N for every model).

    Returns:
        a permutation of ``range(N)``.
    """
    labels = list(follows)
    n = len(follows[labels[0]]) if labels else 0
    differs = [len({tuple(follows[lb][i]) for lb in labels}) > 1 for i in range(n)]
    return [i for i in range(n) if differs[i]] + [i for i in range(n) if not differs[i]]


def constraints_summary(prompts: list[InstructionPrompt]) -> dict[str, int]:
    """How often each instruction id occurs among the prompts (sorted by id)."""
    counts: dict[str, int] = {}
    for p in prompts:
        for v in p.verifiers:
            counts[v.id] = counts.get(v.id, 0) + 1
    return dict(sorted(counts.items()))


def per_instruction_accuracy(prompts: list[InstructionPrompt], result: FollowResult) -> dict[str, float]:
    """Strict accuracy per instruction id (followed / occurrences)."""
    hit: dict[str, list[int]] = {}
    for p, f in zip(prompts, result.follow):
        for v, ok in zip(p.verifiers, f):
            hit.setdefault(v.id, [0, 0])
            hit[v.id][0] += int(ok)
            hit[v.id][1] += 1
    return {k: a / b for k, (a, b) in sorted(hit.items())}



def heldout_prompts(recipe, data_test_path: str | Path | None, max_prompts: int | None) -> tuple[list[InstructionPrompt], str | None]:
    """The held-out instruction prompts of a run and where they came from.

    The rows with constraints of the prepared ``data_test_path`` when it exists;
    otherwise (no prepared run) the held-out split that the data stage would take
    from each ``instructions`` synthetic source of ``recipe.data`` (regenerated,
    same seed and size; pair-level cleaning does not apply to prompts).

    Returns:
        (prompts, description of the source or None when there are none).
    """
    if data_test_path is not None and Path(data_test_path).is_file():
        prompts = load_instruction_prompts(data_test_path, max_prompts)
        return prompts, (str(Path(data_test_path).resolve()) if prompts else None)
    from orpo_core.data.synthetic.instructions.generator import generate_instructions

    rows: list[dict[str, Any]] = []
    for src in recipe.data.sources:
        cfg = src.synthetic
        if cfg is None or cfg.task != "instructions":
            continue
        n_test = int(round(cfg.n_rows * recipe.data.test_size))
        seed = cfg.seed if cfg.seed is not None else recipe.seed
        rows += generate_instructions(n_test, seed, split="test")
    seen: set[str] = set()
    unique = []
    for r in rows:
        key = r["prompt"][-1]["content"]
        if key not in seen:
            seen.add(key)
            unique.append(r)
    prompts = prompts_from_rows(unique, max_prompts)
    return prompts, ("regenerated held-out split of the recipe's synthetic 'instructions' source" if prompts else None)

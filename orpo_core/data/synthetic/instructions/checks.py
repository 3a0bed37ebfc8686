"""Google's 25 IFEval instruction checkers, as lm-eval ships them.

The project does not re-implement IFEval's checks for its IFEval-like data: it uses
``lm_eval.tasks.ifeval.instructions_registry.INSTRUCTION_DICT`` (lm-eval 0.4.x, a copy of
google-research/instruction_following_eval). Each checker class phrases its instruction
(``build_description(**kwargs)``) and checks a response (``check_following(response)``).
lm-eval's module imports NLTK's ``punkt_tab`` tables at import time (and would download
them), so :func:`registry` first makes them available offline
(:func:`orpo_core.data.nltk_data.ensure_punkt_tab`).

Strict checking is lm-eval's ``test_instruction_following_strict``
(``lm_eval/tasks/ifeval/utils.py``): build the checker with the row's kwargs (``None``
values dropped), pass the prompt to the checkers that take ``prompt_to_repeat``, and a
response counts only when it is non-blank.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["INSTRUCTION_IDS", "check", "describe", "registry", "seed_langdetect"]

#: the 25 instruction ids of Google's IFEval (lm-eval's ``INSTRUCTION_DICT`` keys), sorted
INSTRUCTION_IDS: tuple[str, ...] = (
    "change_case:capital_word_frequency",
    "change_case:english_capital",
    "change_case:english_lowercase",
    "combination:repeat_prompt",
    "combination:two_responses",
    "detectable_content:number_placeholders",
    "detectable_content:postscript",
    "detectable_format:constrained_response",
    "detectable_format:json_format",
    "detectable_format:multiple_sections",
    "detectable_format:number_bullet_lists",
    "detectable_format:number_highlighted_sections",
    "detectable_format:title",
    "keywords:existence",
    "keywords:forbidden_words",
    "keywords:frequency",
    "keywords:letter_frequency",
    "language:response_language",
    "length_constraints:nth_paragraph_first_word",
    "length_constraints:number_paragraphs",
    "length_constraints:number_sentences",
    "length_constraints:number_words",
    "punctuation:no_comma",
    "startend:end_checker",
    "startend:quotation",
)


def seed_langdetect(seed: int = 0) -> None:
    """Make ``langdetect`` deterministic (``DetectorFactory.seed``, as langdetect's README advises).

    lm-eval's ``change_case:english_capital`` / ``english_lowercase`` and
    ``language:response_language`` checks call ``langdetect.detect``, which draws random
    samples: unseeded, the same response can pass once and fail the next time (seen on
    short all-caps text). Seeding makes every verdict repeatable: the generator's, the
    on-policy judge's and lm-eval's own ``ifeval`` scoring in this process.
    """
    import langdetect

    langdetect.DetectorFactory.seed = seed


@functools.lru_cache(maxsize=1)
def registry() -> dict[str, type]:
    """lm-eval's ``INSTRUCTION_DICT`` (instruction id -> checker class), imported offline,
    with ``langdetect`` seeded (:func:`seed_langdetect`).

    Raises:
        RuntimeError: NLTK's punkt_tab is missing and cannot be written (see
            :func:`orpo_core.data.nltk_data.ensure_punkt_tab`).
        AssertionError: lm-eval's registry does not hold exactly :data:`INSTRUCTION_IDS`
            (an lm-eval version this module was not written for).
    """
    from orpo_core.data.nltk_data import ensure_punkt_tab

    ensure_punkt_tab()
    seed_langdetect()
    from lm_eval.tasks.ifeval import instructions_registry

    found = dict(instructions_registry.INSTRUCTION_DICT)
    assert tuple(sorted(found)) == INSTRUCTION_IDS, f"lm-eval's IFEval registry changed: {sorted(found)}"
    return found


def _build(instruction_id: str, kwargs: dict[str, Any] | None):
    """lm-eval's checker for one instruction, built with ``kwargs`` (None values dropped), and its wording."""
    cls = registry().get(instruction_id)
    if cls is None:
        raise ValueError(f"unknown IFEval instruction id {instruction_id!r} (known: {', '.join(INSTRUCTION_IDS)})")
    inst = cls(instruction_id)
    return inst, inst.build_description(**{k: v for k, v in (kwargs or {}).items() if v is not None})


def describe(instruction_id: str, kwargs: dict[str, Any] | None) -> str:
    """lm-eval's wording of one instruction (``build_description(**kwargs)``).

    Args:
        instruction_id: one of :data:`INSTRUCTION_IDS`.
        kwargs: the checker's arguments (IFEval's ``kwargs`` entry); every argument the
            checker would otherwise draw at random must be given, so the text is deterministic.

    Raises:
        ValueError: unknown id, or arguments the checker rejects.
    """
    return _build(instruction_id, kwargs)[1]


def check(response: str, instruction_ids: list[str], kwargs: list[dict[str, Any] | None], prompt: str) -> list[bool]:
    """IFEval's strict verdicts for one response (lm-eval ``test_instruction_following_strict``).

    Args:
        response: the model's answer (text, no chat markup).
        instruction_ids: the prompt's instruction ids, in order.
        kwargs: one argument dict per id (same length).
        prompt: the full prompt (``combination:repeat_prompt`` compares against its
            ``prompt_to_repeat`` argument; lm-eval passes the prompt to checkers that ask for it).

    Returns:
        one bool per instruction: followed or not. A blank response follows nothing.

    Raises:
        ValueError: unknown id or mismatched lengths.
    """
    if len(instruction_ids) != len(kwargs):
        raise ValueError(f"{len(instruction_ids)} instruction ids but {len(kwargs)} kwargs")
    out = []
    for iid, kw in zip(instruction_ids, kwargs):
        inst, _ = _build(iid, kw)
        args = inst.get_instruction_args()
        if args and "prompt" in args:  # lm-eval passes the prompt to checkers that want it
            inst.build_description(prompt=prompt)
        out.append(bool(response.strip() and inst.check_following(response)))
    return out

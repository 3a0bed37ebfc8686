"""Minimal repairs: edit a model's own answer until IFEval's checks pass.

On-policy preference pairs (:mod:`orpo_core.data.onpolicy`) take the model's answer as
``rejected`` when it breaks an instruction and, as ``chosen``, the smallest edit of that same
answer that follows every instruction: the text stays the model's own, only what the
instructions ask for changes (commas removed, lower-cased, regrouped into 3 paragraphs
separated by ``***``, a ``P.S.`` or an end phrase appended, wrapped in quotes or JSON, ...).

Each instruction id has one edit (:data:`EDITS`); :func:`repair` applies the edits of a
prompt's instructions in a fixed order (restructure, add, delete, change case, wrap, repeat
the request first) and then checks the result with lm-eval's checkers
(:func:`.checks.check`). Some instructions cannot be met by editing (write in German, at
least 300 words, the letter z at least 9 times): their edit returns the text unchanged and the
final check decides. :func:`repair` returns None when the edited text does not pass every
check, so a chosen answer is never unverified.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from orpo_core.data.synthetic.instructions import bank
from orpo_core.data.synthetic.instructions.checks import check

__all__ = ["EDITS", "ORDER", "repair", "sentences"]

_SENT_END = re.compile(r"(?<=[.!?])\s+")
_LIST_MARK = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+", re.MULTILINE)


def sentences(text: str) -> list[str]:
    """The sentences of ``text``: list markers, markdown dividers and line breaks removed,
    split after ``.``, ``!`` or ``?`` followed by white space."""
    flat = _LIST_MARK.sub("", text)
    flat = re.sub(r"\*{3,}|#+ ", " ", flat)
    flat = re.sub(r"\s+", " ", flat).strip()
    return [s for s in _SENT_END.split(flat) if s.strip()] if flat else []


def _groups(items: list[str], n: int) -> list[list[str]] | None:
    if n < 1 or len(items) < n:
        return None
    size, extra = divmod(len(items), n)
    out, i = [], 0
    for k in range(n):
        j = i + size + (1 if k < extra else 0)
        out.append(items[i:j])
        i = j
    return out


def _paragraphs(text: str, kw: dict[str, Any], _ctx: dict[str, Any]) -> str:
    g = _groups(sentences(text), int(kw["num_paragraphs"]))
    return text if g is None else "\n\n***\n\n".join(" ".join(p) for p in g)


def _nth_first_word(text: str, kw: dict[str, Any], _ctx: dict[str, Any]) -> str:
    g = _groups(sentences(text), int(kw["num_paragraphs"]))
    if g is None:
        return text
    paras = [" ".join(p) for p in g]
    k = int(kw["nth_paragraph"]) - 1
    if 0 <= k < len(paras):
        paras[k] = f"{kw['first_word'].capitalize()} – {paras[k]}"
    return "\n\n".join(paras)


def _sections(text: str, kw: dict[str, Any], _ctx: dict[str, Any]) -> str:
    text = re.sub(r"(?im)^\s*(?:section)\s*\d+\s*:?\s*$", "", text)  # the answer's own section headers go
    g = _groups(sentences(text), int(kw["num_sections"]))
    if g is None:
        return text
    return "\n\n".join(f"{kw['section_spliter']} {i}\n{' '.join(p)}" for i, p in enumerate(g, 1))


def _bullets(text: str, kw: dict[str, Any], _ctx: dict[str, Any]) -> str:
    s = sentences(text)
    n = int(kw["num_bullets"])
    return text if len(s) < n else "\n".join(f"* {x}" for x in s[:n])


def _sentence_count(text: str, kw: dict[str, Any], _ctx: dict[str, Any]) -> str:
    s = sentences(text)
    n = int(kw["num_sentences"])
    if kw["relation"] == "less than" and len(s) >= n:
        return " ".join(s[: max(n - 1, 1)])
    return text


def _word_count(text: str, kw: dict[str, Any], _ctx: dict[str, Any]) -> str:
    if kw["relation"] != "less than":
        return text
    s = sentences(text)
    while len(s) > 1 and len(" ".join(s).split()) >= int(kw["num_words"]):
        s.pop()
    return " ".join(s)


def _two_responses(text: str, _kw: dict[str, Any], ctx: dict[str, Any]) -> str:
    other = ctx.get("other")
    if other and other.strip() != text.strip():
        return f"{text.strip()}\n\n******\n\n{other.strip()}"
    g = _groups(sentences(text), 2)
    return text if g is None else f"{' '.join(g[0])}\n\n******\n\n{' '.join(g[1])}"


def _constrained(text: str, _kw: dict[str, Any], _ctx: dict[str, Any]) -> str:
    return text if any(o in text for o in ("My answer is yes.", "My answer is no.", "My answer is maybe.")) else (
        f"My answer is yes. {text.strip()}"
    )


def _placeholders(text: str, kw: dict[str, Any], _ctx: dict[str, Any]) -> str:
    have = len(re.findall(r"\[.*?\]", text))
    need = int(kw["num_placeholders"]) - have
    names = ("[name]", "[date]", "[address]", "[phone number]", "[email]")
    return text if need <= 0 else f"{text.rstrip()}\n\n" + "\n".join(names[:need])


def _title(text: str, _kw: dict[str, Any], ctx: dict[str, Any]) -> str:
    if re.search(r"<<[^\n]+>>", text):
        return text
    return f"<<{ctx.get('topic', 'an answer').title()}>>\n\n{text.lstrip()}"


def _postscript(text: str, kw: dict[str, Any], ctx: dict[str, Any]) -> str:
    note = bank.POSTSCRIPTS[ctx.get("pick", 0) % len(bank.POSTSCRIPTS)]
    return f"{text.rstrip()}\n\n{kw['postscript_marker']} {note}"


def _highlights(text: str, kw: dict[str, Any], _ctx: dict[str, Any]) -> str:
    n = int(kw["num_highlights"])
    done = 0

    def wrap(m: re.Match) -> str:
        nonlocal done
        s = m.group(0)
        if done >= n or "*" in s or not s.strip():
            return s
        done += 1
        return f"*{s.strip()}*" + (" " if s.endswith(" ") else "")

    return re.sub(r"[^\n.!?]+[.!?]", wrap, text)


def _keywords(text: str, kw: dict[str, Any], _ctx: dict[str, Any]) -> str:
    missing = [k for k in kw["keywords"] if not re.search(k, text, flags=re.IGNORECASE)]
    return text if not missing else f"{text.rstrip()} " + " ".join(f"{k.capitalize()} matters here too." for k in missing)


def _frequency(text: str, kw: dict[str, Any], _ctx: dict[str, Any]) -> str:
    word, n = kw["keyword"], int(kw["frequency"])
    count = len(re.findall(word, text, flags=re.IGNORECASE))
    if kw["relation"] == "at least" and count < n:
        return f"{text.rstrip()} " + " ".join(f"{word.capitalize()} matters." for _ in range(n - count))
    if kw["relation"] == "less than" and count >= n:
        kept = 0

        def drop(m: re.Match) -> str:
            nonlocal kept
            kept += 1
            return m.group(0) if kept < n else ""

        return re.sub(r"\s*\b" + re.escape(word) + r"\b", drop, text, flags=re.IGNORECASE)
    return text


def _forbidden(text: str, kw: dict[str, Any], _ctx: dict[str, Any]) -> str:
    for w in kw["forbidden_words"]:
        text = re.sub(r"\s*\b" + re.escape(w) + r"\b", "", text, flags=re.IGNORECASE)
    return text.strip()


def _capital_words(text: str, kw: dict[str, Any], _ctx: dict[str, Any]) -> str:
    n = int(kw["capital_frequency"])
    if kw["capital_relation"] == "less than":
        return re.sub(r"\b[A-Z]{2,}\b", lambda m: m.group(0).capitalize(), text)
    done = 0

    def up(m: re.Match) -> str:
        nonlocal done
        if done > n:
            return m.group(0)
        done += 1
        return m.group(0).upper()

    return re.sub(r"\b[A-Za-z]{4,}\b", up, text)


def _end(text: str, kw: dict[str, Any], _ctx: dict[str, Any]) -> str:
    phrase = kw["end_phrase"].strip()
    body = text.rstrip()
    return body if body.lower().endswith(phrase.lower()) else f"{body}\n\n{phrase}"


def _unchanged(text: str, _kw: dict[str, Any], _ctx: dict[str, Any]) -> str:
    return text


EDITS: dict[str, Callable[[str, dict[str, Any], dict[str, Any]], str]] = {
    "length_constraints:number_sentences": _sentence_count,
    "length_constraints:number_words": _word_count,
    "length_constraints:number_paragraphs": _paragraphs,
    "length_constraints:nth_paragraph_first_word": _nth_first_word,
    "detectable_format:multiple_sections": _sections,
    "detectable_format:number_bullet_lists": _bullets,
    "combination:two_responses": _two_responses,
    "detectable_format:constrained_response": _constrained,
    "detectable_format:number_highlighted_sections": _highlights,
    "detectable_format:title": _title,
    "detectable_content:number_placeholders": _placeholders,
    "keywords:existence": _keywords,
    "keywords:frequency": _frequency,
    "detectable_content:postscript": _postscript,
    "startend:end_checker": _end,
    "keywords:forbidden_words": _forbidden,
    "change_case:capital_word_frequency": _capital_words,
    "change_case:english_lowercase": lambda t, _k, _c: t.lower(),
    "change_case:english_capital": lambda t, _k, _c: t.upper(),
    "punctuation:no_comma": lambda t, _k, _c: re.sub(r"\s*,", "", t),
    "startend:quotation": lambda t, _k, _c: t if (t.strip()[:1], t.strip()[-1:]) == ('"', '"') else f'"{t.strip()}"',
    "detectable_format:json_format": lambda t, _k, _c: "```json\n" + json.dumps({"answer": t.strip()}, indent=2) + "\n```",
    "combination:repeat_prompt": lambda t, k, _c: f"{k['prompt_to_repeat'].strip()}\n\n{t.lstrip()}",
    # no edit writes another language or adds real content: only a passing answer qualifies
    "language:response_language": _unchanged,
    "keywords:letter_frequency": _unchanged,
}
#: the order edits are applied in: restructure, add, delete, change case, wrap, repeat the request first
ORDER: tuple[str, ...] = tuple(EDITS)


def repair(response: str, request: dict[str, Any], *, other: str | None = None, pick: int = 0) -> str | None:
    """The model's ``response`` edited to follow every instruction of ``request``, or None.

    Args:
        response: the model's answer (plain text).
        request: an IFEval-format row (``prompt``, ``instruction_id_list``, ``kwargs``;
            ``topic`` is used for titles) as made by :func:`.requests.make_requests`.
        other: a second answer to the same prompt (``combination:two_responses``); without
            one the answer is split into two halves.
        pick: chooses among the postscript notes (deterministic).

    Returns:
        the edited text when lm-eval's checks pass on it for every instruction, else None
        (some instructions cannot be met by editing).
    """
    ids, kwargs = request["instruction_id_list"], request["kwargs"]
    ctx = {"topic": request.get("topic"), "other": other, "pick": pick}
    text = response.strip()
    by_id = dict(zip(ids, kwargs))
    for iid in ORDER:
        if iid in by_id:
            text = EDITS[iid](text, by_id[iid] or {}, ctx)
    if not text.strip() or not all(check(text, ids, kwargs, request["prompt"])):
        return None
    return text

"""Seeded preference pairs for instruction following with verifiable constraints.

An instruction is a short content request about a topic of the built-in bank
(:mod:`orpo_core.data.synthetic.instructions.bank`), "Tell me two facts about bees.", followed
by the descriptions of one or two constraints (:mod:`orpo_core.data.synthetic.instructions.verifiers`),
e.g. "Your entire response should be in English, and in all capital letters.".

* ``chosen``: facts of the topic rendered so that every constraint holds;
* ``rejected``: the same facts rendered with one constraint (picked at random)
  not applied: prose instead of bullets or JSON, no title, no postscript, commas
  kept, two more facts for a word limit, a fact without the keyword, ...

Both are checked with the verifiers (lm-eval's IFEval checks) when a row is made: an
:class:`AssertionError` means a generator bug; a chosen answer in capitals or lowercase that
lm-eval's ``langdetect`` test does not call English is drawn again (about one in five
all-caps answers). Responses are short (about 20 to
60 tokens) so a small model trains on them in minutes on a CPU.

Held-out split: the key of a row is (its constraint combination, its topic).
A seeded, fixed fraction of all keys (:data:`HELDOUT_FRACTION`) is held out;
``split="train"`` rows never use a held-out key and ``split="test"`` rows only
use held-out keys, so a held-out prompt asks for a constraint combination about
a topic that training never showed together (each single constraint and each
topic does appear in training). The partition depends on ``seed`` only, not on
the number of rows.

Rows are in the normalized schema of :mod:`orpo_core.data.synthetic.arithmetic` plus
``constraints`` (JSON ``[{"id", "kwargs"}, ...]``, see
:func:`orpo_core.data.synthetic.instructions.verifiers.from_json`) and ``topic``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
from typing import Any, Literal

from orpo_core.data.synthetic.instructions import bank
from orpo_core.data.synthetic.instructions.verifiers import (
    EndChecker,
    EnglishCapital,
    EnglishLowercase,
    ForbiddenWords,
    JsonFormat,
    JsonKey,
    KeywordsExistence,
    NoComma,
    NumberBulletLists,
    NumberParagraphs,
    NumberWords,
    Postscript,
    Quotation,
    REGISTRY,
    Title,
    Verifier,
    build,
    check_all,
    count_words,
    to_json,
)

__all__ = [
    "GENERATED_IDS",
    "HELDOUT_FRACTION",
    "SOURCE",
    "combinations",
    "generate_instructions",
    "heldout_keys",
    "row_key",
]

SOURCE = "synthetic:instructions"
HELDOUT_FRACTION = 0.15

#: constraint ids the generator uses: every verifier but JsonFormat and ForbiddenWords (checked, not generated)
GENERATED_IDS: tuple[str, ...] = tuple(sorted(set(REGISTRY) - {JsonFormat.id, ForbiddenWords.id}))

_CASE = {EnglishCapital.id, EnglishLowercase.id}
_STRUCTURE = {NumberBulletLists.id, NumberParagraphs.id, JsonKey.id}
# pairs that cannot both hold (or would make the rendering ambiguous)
_INCOMPATIBLE = {
    frozenset(p)
    for p in [
        (EnglishCapital.id, EnglishLowercase.id),
        (NumberBulletLists.id, NumberParagraphs.id),
        (NumberBulletLists.id, JsonKey.id),
        (NumberParagraphs.id, JsonKey.id),
        (NumberBulletLists.id, Quotation.id),  # a quote before the first "*" hides that bullet
        (Postscript.id, EndChecker.id),  # both want the last word
        *[(JsonKey.id, other) for other in (*_CASE, Title.id, EndChecker.id, Quotation.id, Postscript.id)],
    ]
}

_NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
_REQUESTS = (
    "Tell me {n} {facts} about {topic}.",
    "Write {n} {sentences} about {topic}.",
    "Give me {n} {facts} about {topic}.",
    "Share {n} simple {facts} about {topic}.",
)
_STOPWORDS = set(
    "about after also because being cannot every their there these those which while where when with without "
    "other people often many much more most some such than that them then they this very what your called "
    "makes make using years during".split()
)


def combinations(max_constraints: int = 2) -> list[tuple[str, ...]]:
    """Every compatible combination of 1..``max_constraints`` generated ids, each sorted, in a fixed order."""
    out: list[tuple[str, ...]] = []
    for k in range(1, max_constraints + 1):
        for combo in itertools.combinations(GENERATED_IDS, k):
            if not any(frozenset(p) in _INCOMPATIBLE for p in itertools.combinations(combo, 2)):
                out.append(combo)
    return out


def _key_hash(seed: int, combo: tuple[str, ...], topic: str) -> float:
    h = hashlib.sha256(json.dumps([seed, list(combo), topic]).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def heldout_keys(seed: int, max_constraints: int = 2, fraction: float = HELDOUT_FRACTION) -> set[tuple[tuple[str, ...], str]]:
    """The held-out (combination, topic) keys: each key is held out when a hash of (seed, key) < ``fraction``."""
    return {
        (combo, topic)
        for combo in combinations(max_constraints)
        for topic in bank.TOPICS
        if _key_hash(seed, combo, topic) < fraction
    }


def row_key(row: dict[str, Any]) -> tuple[tuple[str, ...], str]:
    """(sorted constraint ids, topic) of a generated row."""
    ids = tuple(sorted(c["id"] for c in json.loads(row["constraints"])))
    return ids, row["topic"]


# --------------------------------------------------------------------------- rendering
def _keyword_candidates(fact: str, topic: str) -> list[str]:
    words = re.findall(r"[A-Za-z]+", fact)
    topic_words = {w.lower() for w in re.findall(r"[A-Za-z]+", topic)}
    return sorted(
        {
            w.lower()
            for w in words
            if len(w) >= 5 and w.lower() not in _STOPWORDS and w.lower() not in topic_words and w.lower()[:-1] not in topic_words
        }
    )


def _render(
    facts: list[str],
    topic: str,
    ids: set[str],
    kw: dict[str, dict[str, Any]],
    skip: str | None,
) -> str:
    """The response for ``facts`` under the constraints ``ids`` with the one named ``skip`` not applied."""
    on = {i for i in ids if i != skip}
    if NoComma.id in on:
        facts = [f.replace(", ", " ").replace(",", "") for f in facts]
    if NumberBulletLists.id in on:
        body = "\n".join(f"* {f}" for f in facts)
    elif NumberParagraphs.id in on:
        body = "\n***\n".join(facts)
    elif JsonKey.id in on:
        body = json.dumps({kw[JsonKey.id]["key"]: " ".join(facts)}, ensure_ascii=False)
    elif NumberParagraphs.id in ids:  # violated paragraph constraint: same facts, no divider
        body = "\n\n".join(facts)
    else:
        body = " ".join(facts)
    structured = bool(_STRUCTURE & on) or NumberParagraphs.id in ids
    title = topic[:1].upper() + topic[1:]
    title = " ".join(w[:1].upper() + w[1:] for w in title.split())
    if Title.id in on:
        body = f"<<{title}>>\n\n{body}"
    elif Title.id in ids:
        body = f"{title}\n\n{body}"
    if Postscript.id in ids:
        marker = kw[Postscript.id]["postscript_marker"]
        line = kw[Postscript.id]["_line"]
        body = f"{body}\n\n{marker} {line}" if Postscript.id in on else f"{body}\n\n{line}"
    if EndChecker.id in on:
        sep = "\n\n" if structured or Title.id in ids else " "
        body = f"{body}{sep}{kw[EndChecker.id]['end_phrase']}"
    if Quotation.id in on:
        body = f'"{body}"'
    if EnglishCapital.id in on:
        body = body.upper()
    elif EnglishLowercase.id in on:
        body = body.lower()
    return body


def _make_row(rng: random.Random, combo: tuple[str, ...], topic: str) -> dict[str, Any] | None:
    """One pair for ``combo`` about ``topic``; None when lm-eval's check fails the chosen
    rendering for a reason the rendering cannot control (``langdetect`` calling an all-caps
    or all-lowercase text not English): the caller draws again."""
    ids = set(combo)
    pool = list(bank.FACTS[topic])
    if NumberBulletLists.id in ids or NumberParagraphs.id in ids:
        n = rng.choice([2, 3])
    else:
        n = rng.choice([1, 2, 2, 3])
    kw: dict[str, dict[str, Any]] = {}
    for _ in range(100):
        facts = rng.sample(pool, n)
        rest = [f for f in pool if f not in facts]
        rejected_facts = facts
        if KeywordsExistence.id not in ids:
            break
        # a word of one chosen fact that some unused fact lacks: rejected swaps that fact for it
        options = [
            (i, w, alt)
            for i, f in enumerate(facts)
            for w in _keyword_candidates(f, topic)
            for alt in rest
            if not any(re.search(w, g, flags=re.IGNORECASE) for g in facts[:i] + facts[i + 1 :] + [alt])
        ]
        if options:
            i, word, alt = rng.choice(options)
            kw[KeywordsExistence.id] = {"keywords": [word]}
            rejected_facts = facts[:i] + [alt] + facts[i + 1 :]
            break
    else:  # pragma: no cover - the bank always has keyword candidates
        raise AssertionError(f"generator bug: no keyword for {topic!r}")
    if NumberBulletLists.id in ids:
        kw[NumberBulletLists.id] = {"num_bullets": n}
    if NumberParagraphs.id in ids:
        kw[NumberParagraphs.id] = {"num_paragraphs": n}
    if JsonKey.id in ids:
        kw[JsonKey.id] = {"key": rng.choice(bank.JSON_KEYS)}
    if EndChecker.id in ids:
        kw[EndChecker.id] = {"end_phrase": rng.choice(bank.END_PHRASES)}
    if Postscript.id in ids:
        kw[Postscript.id] = {"postscript_marker": "P.S.", "_line": rng.choice(bank.POSTSCRIPTS)}

    chosen = _render(facts, topic, ids, kw, skip=None)
    violated = rng.choice(sorted(ids))
    if violated == NumberWords.id:
        extra = rng.sample(rest, min(2, len(rest)))
        more = [*facts, *extra]
        kw[NumberWords.id] = {"num_words": count_words(chosen) + rng.randint(1, 5), "relation": "less than"}
        rejected = _render(more, topic, ids, kw, skip=None)
    else:
        if NumberWords.id in ids:
            kw[NumberWords.id] = {"num_words": count_words(chosen) + rng.randint(1, 5), "relation": "less than"}
        rejected = _render(rejected_facts if violated == KeywordsExistence.id else facts, topic, ids, kw, skip=violated)

    verifiers: list[Verifier] = []
    for cid in combo:
        verifiers.append(build(cid, {k: v for k, v in kw.get(cid, {}).items() if not k.startswith("_")}))
    rng.shuffle(verifiers)
    ok_chosen = check_all(chosen, verifiers)
    if not all(ok_chosen):
        failed = {v.id for v, ok in zip(verifiers, ok_chosen) if not ok}
        assert failed <= _CASE, f"generator bug: chosen fails {verifiers} {ok_chosen}: {chosen!r}"
        return None
    assert not all(check_all(rejected, verifiers)), f"generator bug: rejected passes {verifiers}: {rejected!r}"

    word = "fact" if n == 1 else "facts"
    request = rng.choice(_REQUESTS).format(
        n=_NUMBERS[n], facts=word, sentences="sentence" if n == 1 else "sentences", topic=topic
    )
    prompt = " ".join([request, *(v.description for v in verifiers)])
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "source": SOURCE,
        "score_chosen": 1.0,
        "score_rejected": 0.0,
        "constraints": to_json(verifiers),
        "topic": topic,
    }


def generate_instructions(
    n_rows: int,
    seed: int = 0,
    split: Literal["train", "test"] = "train",
    max_constraints: int = 2,
) -> list[dict[str, Any]]:
    """Generate ``n_rows`` instruction-following preference rows, deterministically from ``seed``.

    Args:
        n_rows: number of rows (>= 0). Rows may repeat (dedup is the data stage's job).
        seed: seeds both the held-out partition and the rows.
        split: ``"train"`` rows use only keys outside :func:`heldout_keys`,
            ``"test"`` rows only held-out keys.
        max_constraints: 1 or 2 constraints per prompt (each count equally likely).

    Returns:
        list of dicts: ``prompt`` (one user message), ``chosen`` / ``rejected``
        (one assistant message each), ``source`` (:data:`SOURCE`),
        ``score_chosen`` 1.0, ``score_rejected`` 0.0, ``constraints`` (JSON
        string) and ``topic``.

    Raises:
        ValueError: ``split`` not train/test, ``max_constraints`` < 1 or ``n_rows`` < 0.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if max_constraints < 1:
        raise ValueError(f"max_constraints must be >= 1, got {max_constraints}")
    if n_rows < 0:
        raise ValueError(f"n_rows must be >= 0, got {n_rows}")
    held = heldout_keys(seed, max_constraints)
    by_size: dict[int, list[tuple[tuple[str, ...], str]]] = {}
    for combo in combinations(max_constraints):
        for topic in bank.TOPICS:
            if ((combo, topic) in held) == (split == "test"):
                by_size.setdefault(len(combo), []).append((combo, topic))
    sizes = sorted(by_size)
    rng = random.Random(f"{seed}|{split}")
    rows = []
    while len(rows) < n_rows:
        combo, topic = rng.choice(by_size[rng.choice(sizes)])
        row = _make_row(rng, combo, topic)
        if row is not None:  # else: lm-eval's langdetect rejected the chosen casing; draw again
            rows.append(row)
    return rows

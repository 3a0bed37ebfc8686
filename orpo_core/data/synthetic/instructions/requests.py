"""IFEval-like requests: a writing task (essay, letter, poem, story, advertisement, ...) with
1 to 3 verifiable instructions, over all 25 of Google's IFEval instruction ids.

The request itself ("Write a short poem about rivers.") comes from the templates below; each
instruction is phrased by lm-eval's own checker (``build_description(**kwargs)``, see
:mod:`.checks`) with arguments drawn here from a seeded :class:`random.Random` (lm-eval's
checkers draw from the global ``random`` when an argument is missing; we never let them).
Combinations follow lm-eval's ``INSTRUCTION_CONFLICTS`` (no two conflicting ids in one prompt).

Wording: IFEval's prompts phrase the same instruction in many ways, so for the ids of
:data:`PARAPHRASES` the text is drawn among lm-eval's description and our paraphrases.
Decontamination: a prompt must not share a 13-gram (lower-cased word tokens) with any of the
541 prompts of Google's IFEval (:class:`.decontaminate.NgramIndex`). Some of lm-eval's own
descriptions do (they are IFEval's wording: "At the end of your response, please explicitly
add a postscript starting with ..."); for those ids only a paraphrase is used, and a prompt
that still collides is dropped and counted (``stats["dropped_contaminated"]``).

A request is a dict ``{"prompt", "request", "kind", "topic", "instruction_id_list",
"kwargs"}`` in IFEval's input format (``kwargs`` one dict per id), so IFEval's checks apply
to it unchanged.
"""

from __future__ import annotations

import random
import string
from typing import Any

from orpo_core.data.synthetic.instructions import bank
from orpo_core.data.synthetic.instructions.checks import INSTRUCTION_IDS, describe, registry

__all__ = ["KINDS", "PARAPHRASES", "make_requests", "sample_kwargs"]

#: writing tasks, each with request templates ({topic}; letters also {recipient})
KINDS: dict[str, tuple[str, ...]] = {
    "essay": ("Write a short essay about {topic}.", "Write an essay about what makes {topic} interesting."),
    "letter": ("Write a letter to {recipient} about {topic}.", "Write a short letter to {recipient} telling them about {topic}."),
    "poem": ("Write a poem about {topic}.", "Write a short poem that describes {topic}."),
    "story": ("Write a story for children about {topic}.", "Tell a short story that features {topic}."),
    "advertisement": ("Write an advertisement for a shop that sells things related to {topic}.",
                      "Write an ad for a tour that lets visitors learn about {topic}."),
    "blog": ("Write a blog post about {topic}.", "Write a blog post with tips for people who love {topic}."),
    "email": ("Write an email to {recipient} inviting them to a talk about {topic}.",),
    "summary": ("Summarize what people should know about {topic}.", "Give a summary of the main facts about {topic}."),
    "rewrite": ('Rewrite the following text in your own words: "{fact}"', 'Rephrase this sentence for a young reader: "{fact}"'),
    "description": ("Describe {topic} to someone who knows nothing about the subject.", "Explain {topic} to a ten year old."),
    "question": ("Would {topic} make a good subject for a school project?", "Is it worth learning more about {topic}?"),
}
RECIPIENTS = ("a friend", "your teacher", "your neighbor", "the mayor of your town", "your grandmother", "a new colleague")
#: kinds whose answer is a yes/no judgement: the only ones given detectable_format:constrained_response
_YES_NO = {"question"}

#: our wording for the ids whose lm-eval description shares 13-grams with IFEval's prompts
PARAPHRASES: dict[str, tuple[str, ...]] = {
    "detectable_content:number_placeholders": (
        "Put at least {num_placeholders} placeholders in square brackets, like [name], in your answer.",
        "Leave at least {num_placeholders} blanks for the reader to fill in, written in square brackets such as [date].",
    ),
    "detectable_content:postscript": (
        "Close your answer with a note that begins with {postscript_marker}",
        "Add a short postscript at the very end that starts with {postscript_marker}",
    ),
    "detectable_format:constrained_response": (
        'Reply with exactly one of these: "My answer is yes.", "My answer is no.", "My answer is maybe."',
        'Answer only with "My answer is yes.", "My answer is no." or "My answer is maybe."',
    ),
    "detectable_format:number_highlighted_sections": (
        "Mark at least {num_highlights} parts of the answer as highlighted with markdown, like *this part*.",
        "Use markdown to highlight at least {num_highlights} sections, for example *an important part*.",
    ),
    "detectable_format:title": (
        "Give the answer a title inside double angle brackets, like <<a title>>.",
        "Start with a title wrapped in double angular brackets, for example <<my title>>.",
    ),
    "combination:two_responses": (
        "Write two different answers and put six asterisks ****** between them.",
        "Give me two distinct versions, separated by a line of six asterisks: ******",
    ),
    "combination:repeat_prompt": (
        "Start by copying my request above word for word, then answer it (copy only the request, not this sentence).",
        "Before answering, repeat the request above exactly as written (leave out this sentence), then give your answer.",
    ),
    "startend:end_checker": (
        "The very last words of your answer must be: {end_phrase}",
        'End your reply with the exact words "{end_phrase}" and write nothing after them.',
    ),
    "startend:quotation": ("Put your whole answer inside double quotes.", "Enclose the entire reply in double quotation marks."),
    "change_case:english_lowercase": (
        "Write the whole answer in English using only lowercase letters.",
        "Your reply must be all lowercase, with no capital letters at all.",
        "Use lowercase letters only in your answer; do not capitalize anything, not even names.",
    ),
    "change_case:english_capital": (
        "Write your whole answer in English using capital letters only.",
        "Your entire reply must be in uppercase English letters.",
    ),
    "change_case:capital_word_frequency": ("Use words written entirely in capitals {capital_relation} {capital_frequency} times.",),
    "punctuation:no_comma": ("Do not use any commas in your answer.", "Your reply must not contain a single comma."),
    "length_constraints:number_words": ("Your answer should be {relation} {num_words} words long.",),
}
#: ids whose wording is drawn among lm-eval's own and the paraphrases (IFEval's prompts phrase them many ways)
VARIED = frozenset(PARAPHRASES)

_END_PHRASES = tuple(dict.fromkeys(("Any other questions?", "Is there anything else I can help with?") + bank.END_PHRASES))
_LANGUAGES = ("es", "fr", "de", "it", "pt")


def _word_list() -> list[str]:
    registry()  # imports lm-eval's ifeval modules offline
    from lm_eval.tasks.ifeval import instructions_util

    return list(instructions_util.WORD_LIST)


def _topic_words(topic: str) -> list[str]:
    words = [w for f in bank.FACTS[topic] for w in f.lower().strip(".").replace(",", "").split() if len(w) > 4]
    return sorted(set(words)) or [topic.split()[-1]]


def sample_kwargs(rng: random.Random, instruction_id: str, topic: str, words: list[str]) -> dict[str, Any]:
    """Arguments of one instruction, drawn from ``rng`` (every argument lm-eval would draw itself).

    ``combination:repeat_prompt`` gets ``prompt_to_repeat`` later (it is the finished request).
    Numbers stay small enough for answers of about 100 to 200 words.

    Raises:
        ValueError: unknown id.
    """
    rel = rng.choice(("less than", "at least"))
    tw = _topic_words(topic)
    match instruction_id:
        case "change_case:capital_word_frequency":
            return {"capital_frequency": rng.randint(2, 8), "capital_relation": rel}
        case "detectable_content:number_placeholders":
            return {"num_placeholders": rng.randint(1, 3)}
        case "detectable_content:postscript":
            return {"postscript_marker": rng.choice(("P.S.", "P.P.S"))}
        case "detectable_format:multiple_sections":
            return {"section_spliter": rng.choice(("Section", "SECTION")), "num_sections": rng.randint(2, 4)}
        case "detectable_format:number_bullet_lists":
            return {"num_bullets": rng.randint(2, 5)}
        case "detectable_format:number_highlighted_sections":
            return {"num_highlights": rng.randint(1, 3)}
        case "keywords:existence":
            return {"keywords": sorted({rng.choice(tw), rng.choice(words)})}
        case "keywords:forbidden_words":
            return {"forbidden_words": sorted({rng.choice(tw), rng.choice(("the", "and", "very", "many", "also"))})}
        case "keywords:frequency":
            return {"keyword": rng.choice(tw), "frequency": rng.randint(1, 3), "relation": rel}
        case "keywords:letter_frequency":
            return {"letter": rng.choice(string.ascii_lowercase), "let_frequency": rng.randint(1, 10), "let_relation": rel}
        case "language:response_language":
            return {"language": rng.choice(_LANGUAGES)}
        case "length_constraints:nth_paragraph_first_word":
            n = rng.randint(2, 4)
            return {"num_paragraphs": n, "nth_paragraph": rng.randint(1, n), "first_word": rng.choice(words)}
        case "length_constraints:number_paragraphs":
            return {"num_paragraphs": rng.randint(2, 4)}
        case "length_constraints:number_sentences":
            return {"num_sentences": rng.randint(2, 10), "relation": rel}
        case "length_constraints:number_words":
            return {"num_words": rng.randint(3, 20) * 10, "relation": rel}
        case "startend:end_checker":
            return {"end_phrase": rng.choice(_END_PHRASES)}
        case _ if instruction_id in INSTRUCTION_IDS:
            return {}
    raise ValueError(f"unknown IFEval instruction id {instruction_id!r}")


def _conflicts() -> dict[str, set[str]]:
    registry()
    from lm_eval.tasks.ifeval import instructions_registry

    return {k: set(v) for k, v in instructions_registry.INSTRUCTION_CONFLICTS.items()}


def _pick_ids(rng: random.Random, n: int, kind: str, conflicts: dict[str, set[str]]) -> list[str]:
    if kind in _YES_NO:
        return ["detectable_format:constrained_response"]
    pool = [i for i in INSTRUCTION_IDS if i != "detectable_format:constrained_response"]
    ids: list[str] = []
    for _ in range(50):
        if len(ids) == n:
            break
        cand = rng.choice(pool)
        if cand in ids or any(cand in conflicts.get(i, ()) or i in conflicts.get(cand, ()) for i in ids):
            continue
        ids.append(cand)
    return ids


def _phrase(rng: random.Random, iid: str, kwargs: dict[str, Any], index) -> tuple[str, bool]:
    """The instruction's wording and whether it is a paraphrase: lm-eval's description, or one of our
    paraphrases (drawn among both for the ids of :data:`VARIED`; always a paraphrase when lm-eval's
    wording shares a 13-gram with the benchmark)."""
    text = describe(iid, kwargs)
    if iid not in PARAPHRASES:
        return text, False
    collides = index is not None and index.shares_ngram(text)
    options = list(PARAPHRASES[iid]) + ([] if collides else [None])
    pick = rng.choice(options)
    return (text, False) if pick is None else (pick.format(**kwargs), True)


def make_requests(n: int, *, seed: int, index=None, max_instructions: int = 3) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``n`` IFEval-like requests (fewer if some are dropped as contaminated).

    Args:
        n: requests to draw.
        seed: the only source of randomness (same seed, same requests).
        index: a :class:`.decontaminate.NgramIndex` of the benchmark prompts, or None (no check).
        max_instructions: 1 to this many instructions per request (uniform).

    Returns:
        (requests, stats): ``stats`` counts ``drawn``, ``kept``, ``dropped_contaminated``,
        ``paraphrased`` (descriptions replaced because lm-eval's wording collides) and
        ``per_instruction`` (kept requests per id).
    """
    rng = random.Random(seed)
    words = _word_list()
    conflicts = _conflicts()
    out: list[dict[str, Any]] = []
    stats: dict[str, Any] = {"drawn": 0, "kept": 0, "dropped_contaminated": 0, "paraphrased": 0, "per_instruction": {}}
    for _ in range(n):
        stats["drawn"] += 1
        kind = rng.choice(sorted(KINDS))
        topic = rng.choice(bank.TOPICS)
        request = rng.choice(KINDS[kind]).format(
            topic=topic, recipient=rng.choice(RECIPIENTS), fact=rng.choice(bank.FACTS[topic])
        )
        ids = _pick_ids(rng, rng.randint(1, max_instructions), kind, conflicts)
        kwargs = [sample_kwargs(rng, i, topic, words) for i in ids]
        parts = [request]
        for iid, kw in zip(ids, kwargs):
            if iid == "combination:repeat_prompt":
                continue
            text, para = _phrase(rng, iid, kw, index)
            stats["paraphrased"] += para
            parts.append(text)
        if "combination:repeat_prompt" in ids:  # the request to repeat is everything before this sentence
            j = ids.index("combination:repeat_prompt")
            kwargs[j] = {"prompt_to_repeat": " ".join(parts)}
            text, para = _phrase(rng, ids[j], kwargs[j], index)
            stats["paraphrased"] += para
            parts.append(text)
        prompt = " ".join(parts)
        if index is not None and index.shares_ngram(prompt):
            stats["dropped_contaminated"] += 1
            continue
        out.append({"prompt": prompt, "request": request, "kind": kind, "topic": topic,
                    "instruction_id_list": ids, "kwargs": kwargs})
        for i in ids:
            stats["per_instruction"][i] = stats["per_instruction"].get(i, 0) + 1
    stats["kept"] = len(out)
    stats["per_instruction"] = dict(sorted(stats["per_instruction"].items()))
    return out, stats

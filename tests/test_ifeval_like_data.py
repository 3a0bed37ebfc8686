"""IFEval-like requests on lm-eval's checkers, 13-gram decontamination, minimal repairs and
on-policy pairs (orpo_core.data.synthetic.instructions.{checks,requests,decontaminate,repair},
orpo_core.data.onpolicy)."""

from __future__ import annotations

import json
import re

import pytest

from orpo_core.data.onpolicy import build_pairs, complete_sentences, sample_answers
from orpo_core.data.synthetic.instructions.checks import INSTRUCTION_IDS, check, describe, registry
from orpo_core.data.synthetic.instructions.decontaminate import NgramIndex, words
from orpo_core.data.synthetic.instructions.repair import repair
from orpo_core.data.synthetic.instructions.requests import PARAPHRASES, make_requests


def _req(ids_kwargs: list[tuple[str, dict]], prompt: str = "Write a short essay about bees.", topic: str = "bees") -> dict:
    return {"prompt": prompt, "request": prompt, "kind": "essay", "topic": topic,
            "instruction_id_list": [i for i, _ in ids_kwargs], "kwargs": [k for _, k in ids_kwargs]}


ANSWER = ("Bees live in large groups, and they share the work. A bee visits many flowers, collecting nectar. "
          "Bees make honey, which they store in wax cells. The queen lays the eggs. Workers feed the young.")


# ------------------------------------------------------------------ lm-eval's checkers
def test_registry_is_lm_evals_25_ids_and_checks_are_theirs():
    reg = registry()
    assert tuple(sorted(reg)) == INSTRUCTION_IDS and len(INSTRUCTION_IDS) == 25
    assert reg["punctuation:no_comma"].__module__ == "lm_eval.tasks.ifeval.instructions"
    assert check("no commas here at all", ["punctuation:no_comma"], [{}], "p") == [True]
    assert check("one, two", ["punctuation:no_comma"], [{}], "p") == [False]
    assert check("   ", ["punctuation:no_comma"], [{}], "p") == [False]  # blank follows nothing (lm-eval strict)
    kw = {"prompt_to_repeat": "Write a poem."}
    assert check("Write a poem. Roses are red.", ["combination:repeat_prompt"], [kw], "p") == [True]
    assert check("Roses are red.", ["combination:repeat_prompt"], [kw], "p") == [False]
    assert describe("detectable_format:number_bullet_lists", {"num_bullets": 3}).startswith(
        "Your answer must contain exactly 3 bullet points.")
    with pytest.raises(ValueError, match="unknown IFEval instruction id"):
        check("x", ["no:such"], [{}], "p")
    with pytest.raises(ValueError, match="2 instruction ids but 1 kwargs"):
        check("x", ["punctuation:no_comma", "startend:quotation"], [{}], "p")


# ------------------------------------------------------------------ decontamination
def test_ngram_index_by_hand(tmp_path):
    bench = "One two three four five six seven eight nine ten eleven twelve thirteen fourteen."
    idx = NgramIndex([bench])
    assert idx.shares_ngram("ONE, two; three four five six seven eight nine ten eleven twelve thirteen!")
    assert not idx.shares_ngram("one two three four five six seven eight nine ten eleven twelve")  # 12 words
    assert not idx.shares_ngram("two three four five six seven eight nine ten eleven twelve thirteen sixteen")
    assert words("It's 2 o'clock") == ["it", "s", "2", "o", "clock"]
    bad = tmp_path / "bench.jsonl"
    bad.write_text(json.dumps({"prompt": bench}) + "\n" + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bench\.jsonl: line 2: .*'prompt'"):
        NgramIndex.from_ifeval(bad)


# ------------------------------------------------------------------ requests
@pytest.fixture(scope="module")
def ifeval_index(shared_data):
    return NgramIndex.from_ifeval(shared_data / "eval" / "ifeval_input.jsonl")


def test_requests_cover_all_ids_follow_lm_eval_conflicts_and_are_seeded(ifeval_index):
    from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_CONFLICTS

    reqs, stats = make_requests(500, seed=3, index=ifeval_index)
    again, _ = make_requests(500, seed=3, index=ifeval_index)
    other, _ = make_requests(500, seed=4, index=ifeval_index)
    assert reqs == again and reqs != other
    assert set(stats["per_instruction"]) == set(INSTRUCTION_IDS)
    assert stats["kept"] == len(reqs) == stats["drawn"] - stats["dropped_contaminated"]
    for r in reqs:
        ids = r["instruction_id_list"]
        assert 1 <= len(ids) <= 3 and len(set(ids)) == len(ids)
        for a in ids:
            assert not (set(ids) - {a}) & set(INSTRUCTION_CONFLICTS[a]), ids
        for iid, kw in zip(ids, r["kwargs"]):
            text = describe(iid, kw)  # every argument is given: the wording is deterministic
            assert text == describe(iid, kw)
            if iid != "combination:repeat_prompt":
                assert text in r["prompt"] or iid in PARAPHRASES, (iid, r["prompt"])
        if "combination:repeat_prompt" in ids:
            kw = r["kwargs"][ids.index("combination:repeat_prompt")]
            assert r["prompt"].startswith(kw["prompt_to_repeat"])


def test_no_request_shares_a_13_gram_with_any_ifeval_prompt(ifeval_index, shared_data):
    reqs, stats = make_requests(400, seed=11, index=ifeval_index)
    assert stats["paraphrased"] > 0  # lm-eval's own wording collides for some ids: replaced
    for r in reqs:
        assert not ifeval_index.shares_ngram(r["prompt"]), r["prompt"]
    # without the index, lm-eval's wording is kept and does collide: the check has teeth
    raw, _ = make_requests(400, seed=11, index=None)
    assert any(ifeval_index.shares_ngram(r["prompt"]) for r in raw)


# ------------------------------------------------------------------ repairs
@pytest.mark.parametrize(
    "iid, kwargs",
    [
        ("punctuation:no_comma", {}),
        ("change_case:english_lowercase", {}),
        ("change_case:english_capital", {}),
        ("startend:quotation", {}),
        ("detectable_format:title", {}),
        ("detectable_format:json_format", {}),
        ("detectable_content:postscript", {"postscript_marker": "P.P.S"}),
        ("startend:end_checker", {"end_phrase": "Any other questions?"}),
        ("length_constraints:number_paragraphs", {"num_paragraphs": 3}),
        ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "honey"}),
        ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2}),
        ("detectable_format:number_bullet_lists", {"num_bullets": 4}),
        ("detectable_format:number_highlighted_sections", {"num_highlights": 2}),
        ("detectable_content:number_placeholders", {"num_placeholders": 2}),
        ("keywords:existence", {"keywords": ["garden", "summer"]}),
        ("keywords:forbidden_words", {"forbidden_words": ["bees", "honey"]}),
        ("keywords:frequency", {"keyword": "bees", "frequency": 2, "relation": "less than"}),
        ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"}),
        ("length_constraints:number_words", {"num_words": 20, "relation": "less than"}),
        ("change_case:capital_word_frequency", {"capital_frequency": 3, "capital_relation": "at least"}),
        ("combination:two_responses", {}),
        ("combination:repeat_prompt", {"prompt_to_repeat": "Write a short essay about bees."}),
    ],
)
def test_repair_makes_a_failing_answer_pass_with_a_small_edit(iid, kwargs):
    req = _req([(iid, kwargs)])
    assert check(ANSWER, [iid], [kwargs], req["prompt"]) == [False]
    fixed = repair(ANSWER, req)
    assert fixed is not None and check(fixed, [iid], [kwargs], req["prompt"]) == [True]
    # the model's words stay: most of the answer's words are still there
    kept = set(words(ANSWER)) & set(words(fixed))
    assert len(kept) >= 0.5 * len(set(words(ANSWER[: len(ANSWER) // 2]))), (iid, fixed)


def test_repair_combines_edits_and_refuses_what_editing_cannot_do():
    req = _req([("change_case:english_lowercase", {}), ("punctuation:no_comma", {}),
                ("detectable_content:postscript", {"postscript_marker": "P.S."})])
    fixed = repair(ANSWER, req)
    assert fixed is not None and fixed == fixed.lower() and "," not in fixed and "\n\np.s. " in fixed
    assert fixed.startswith("bees live in large groups and they share the work.")
    assert repair(ANSWER, _req([("language:response_language", {"language": "de"})])) is None
    assert repair(ANSWER, _req([("length_constraints:number_words", {"num_words": 400, "relation": "at least"})])) is None


# ------------------------------------------------------------------ on-policy pairs
def test_complete_sentences_cuts_only_an_unfinished_tail():
    assert complete_sentences("A b. C d") == "A b."
    assert complete_sentences("A b. C d.") == "A b. C d."
    assert complete_sentences('He said "hi." Then') == 'He said "hi."'
    assert complete_sentences("no sentence end") == "no sentence end"


def test_build_pairs_pairs_failing_answers_with_their_repair():
    reqs = [
        _req([("punctuation:no_comma", {})]),
        _req([("punctuation:no_comma", {})]),
        _req([("language:response_language", {"language": "de"})]),
        _req([("startend:end_checker", {"end_phrase": "That is all."})]),
    ]
    answers = [ANSWER, "Bees make honey. They live in hives.", ANSWER, ANSWER + " Workers also guard the"]
    rows, stats = build_pairs(reqs, answers)
    assert stats["pairs"] == 2 and stats["answers_following_all"] == 0.25 and stats["unrepairable"] == 1
    assert stats["per_instruction"]["punctuation:no_comma"] == {"n": 2, "followed": 1, "pairs": 1}
    a, b = rows
    assert a["rejected"][0]["content"] == ANSWER and "," not in a["chosen"][0]["content"]
    assert b["rejected"][0]["content"].endswith("guard the")  # the model's own (cut) answer
    assert b["chosen"][0]["content"].endswith("feed the young.\n\nThat is all.")  # unfinished tail dropped
    assert json.loads(a["constraints"]) == [{"id": "punctuation:no_comma", "kwargs": {}}]
    with pytest.raises(ValueError, match="4 requests but 3 answers"):
        build_pairs(reqs, answers[:3])


def test_sample_answers_is_seeded_and_aligned(tiny_model_dir, tiny_tok):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompts = ["Write a poem.", "Tell me a long story about the sea and the ships on it.", "Hi"]
    side = tiny_tok.padding_side
    a = sample_answers(model, tiny_tok, prompts, max_new_tokens=6, batch_size=2, seed=5)
    b = sample_answers(model, tiny_tok, prompts, max_new_tokens=6, batch_size=2, seed=5)
    assert a == b and len(a) == 3 and tiny_tok.padding_side == side  # the tokenizer is left as it was
    greedy_batched = sample_answers(model, tiny_tok, prompts, max_new_tokens=6, batch_size=3, temperature=0)
    greedy_single = [sample_answers(model, tiny_tok, [p], max_new_tokens=6, batch_size=1, temperature=0)[0] for p in prompts]
    assert greedy_batched == greedy_single  # answers come back in input order, left padding changes nothing
    assert all(isinstance(x, str) and not re.search(r"<\|im_(start|end)\|>", x) for x in a)

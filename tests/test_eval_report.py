"""run_evaluation end to end (base vs trained report), model loading, input validation, curves."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import orpo_core.evaluation.loading as loading
from orpo_core.config import recipe_from_dict
from orpo_core.evaluation import EvalInputError, load_log_history, plot_curves, run_evaluation, validate_model_source
from orpo_core.data.synthetic.arithmetic import generate_arithmetic

CONTRACT_KEYS = {"preference/accuracy", "preference/margin", "preference/log_odds", "perplexity/chosen", "perplexity/corpus"}


def _ids(tok, messages, gen):
    return list(tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=True)["input_ids"])


def make_tokenized(root: Path, model_dir: Path, n: int = 12) -> Path:
    """A tokenize-stage folder (contract section 2) built with the tiny model's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    cols: dict[str, list] = {"prompt_input_ids": [], "chosen_input_ids": [], "rejected_input_ids": [], "source": []}
    for r in generate_arithmetic(n, 5):
        p = _ids(tok, r["prompt"], True)
        cols["prompt_input_ids"].append(p)
        cols["chosen_input_ids"].append(_ids(tok, r["prompt"] + r["chosen"], False)[len(p) :])
        cols["rejected_input_ids"].append(_ids(tok, r["prompt"] + r["rejected"], False)[len(p) :])
        cols["source"].append(r["source"])
    out = root / "tokenized"
    out.mkdir(parents=True)
    ids_type = pa.list_(pa.int32())
    table = pa.table({k: pa.array(v, ids_type if k != "source" else pa.string()) for k, v in cols.items()})
    pq.write_table(table, out / "test.parquet", compression="zstd")
    tok.save_pretrained(out / "tokenizer")
    return out


def make_recipe(tmp_path: Path, **eval_cfg):
    return recipe_from_dict(
        {
            "run_name": "t",
            "output_dir": str(tmp_path / "run"),
            "seed": 7,
            "model": {"name_or_path": "tiny", "dtype": "float32"},
            "data": {"sources": [{"synthetic": {"n_rows": 10}}], "max_length": 96, "max_prompt_length": 48},
            "orpo": {"beta": 0.2},
            "eval": {"bootstrap_samples": 100, "max_new_tokens": 8, "batch_size": 4, **eval_cfg},
        }
    )


def _greedy(model_dir, tok, text, n):
    """Independent greedy decode: argmax loop over the chat-templated prompt."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = _ids(tok, [{"role": "user", "content": text}], True)
    new = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    return tok.decode(new, skip_special_tokens=True)


def test_run_evaluation_base_vs_trained(tmp_path, tiny_model_dir):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("A small corpus of plain text for the perplexity check.\n" * 30)
    recipe = make_recipe(tmp_path, corpus=str(corpus), corpus_max_tokens=400, stride=32, prompts=["What is 2 + 3?", "Hi"])
    tokenized = make_tokenized(tmp_path, tiny_model_dir)
    history = [{"step": s, "loss": 2.0 / s, "rewards/margins": 0.01 * s, "rewards/accuracies": 0.5} for s in (1, 2, 3)]
    history.append({"step": 3, "eval_loss": 1.0, "eval_rewards/margins": 0.02, "eval_rewards/accuracies": 0.6})
    out = tmp_path / "eval"
    rep = run_evaluation(recipe, tiny_model_dir, tokenized, out, log_history=history)

    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "eval.json", "eval.md"]  # no temp leftovers
    on_disk = json.loads((out / "eval.json").read_text())
    assert on_disk["results"] == rep["results"]
    for label in ("trained", "base"):
        assert CONTRACT_KEYS <= set(rep["results"][label])
        for k in CONTRACT_KEYS:
            detail = rep["metrics"][label][k]
            assert detail["n"] > 0
            if k != "perplexity/corpus":
                lo, hi = detail["ci95"]
                assert lo <= detail["value"] <= hi
    assert rep["metrics"]["trained"]["preference/accuracy"]["n"] == 12
    # base = recipe.model resolved under the run folder (tiny, seed 7): different weights than trained (seed 0)
    assert Path(rep["models"]["base"]["name_or_path"]) == (tmp_path / "run" / "base_model").resolve()
    for k, d in rep["deltas"].items():
        assert d == pytest.approx(rep["results"]["trained"][k] - rep["results"]["base"][k])
    assert rep["deltas"]["perplexity/chosen"] != 0
    # weights fingerprint is the real file hash
    sha = hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert rep["models"]["trained"]["fingerprint"]["weight_files"]["model.safetensors"]["sha256"] == sha
    # corpus settings reported: window = data.max_length (eval.window unset), stride as configured
    c = rep["settings"]["corpus"]
    assert (c["window"], c["stride"], c["tokens"]) == (96, 32, 400)
    assert rep["metrics"]["trained"]["perplexity/corpus"]["n"] == 399
    # generations: greedy, chat template, both models side by side
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenized / "tokenizer")
    assert [g["prompt"] for g in rep["generations"]] == ["What is 2 + 3?", "Hi"]
    assert rep["generations"][0]["trained"] == _greedy(tiny_model_dir, tok, "What is 2 + 3?", 8)
    assert "base" in rep["generations"][1]
    md = (out / "eval.md").read_text()
    assert "| `preference/accuracy` |" in md and "## Generations" in md and "![training curves](curves.png)" in md
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_evaluation_with_offline_task(tmp_path, tiny_model_dir, shared_data):
    recipe = make_recipe(
        tmp_path, tasks=["piqa"], limit=6, tasks_dir=str(shared_data / "eval"), compare_base=False, n_prompts=1
    )
    tokenized = make_tokenized(tmp_path, tiny_model_dir, n=4)
    rep = run_evaluation(recipe, tiny_model_dir, tokenized, tmp_path / "eval")
    assert set(rep["results"]) == {"trained"} and rep["deltas"] == {}
    acc = rep["metrics"]["trained"]["lm_eval/piqa/acc,none"]
    assert acc["n"] == 6 and acc["version"] == 1.0 and 0 <= acc["value"] <= 1
    assert rep["lm_eval"]["tasks"]["piqa"]["lm_eval_task"] == "orpo_local_piqa"
    assert rep["generations"][0]["source"] == "held-out row 0"
    assert not (tmp_path / "eval" / "curves.png").exists()  # no log history


@pytest.fixture
def no_model_loading(monkeypatch):
    calls = []

    def boom(*a, **k):
        calls.append(a)
        raise AssertionError("a model was loaded before the inputs were validated")

    monkeypatch.setattr(loading, "load_eval_model", boom)
    monkeypatch.setattr(loading, "_from_pretrained", boom)
    return calls


@pytest.mark.parametrize("case", ["model_dir", "unknown_task", "offline_file", "corpus", "heldout", "adapter_base"])
def test_bad_input_fails_before_any_model_load(case, tmp_path, tiny_model_dir, no_model_loading):
    tokenized = make_tokenized(tmp_path, tiny_model_dir, n=3)
    model_dir, cfg, expect = tiny_model_dir, {}, None
    if case == "model_dir":
        model_dir, expect = tmp_path / "nope" / "model", "nope/model"
    elif case == "unknown_task":
        cfg, expect = {"tasks": ["not_a_real_task_xyz"]}, "not_a_real_task_xyz"
    elif case == "offline_file":
        (tmp_path / "empty").mkdir()
        cfg, expect = {"tasks": ["orpo_local_boolq"], "tasks_dir": str(tmp_path / "empty")}, "boolq_dev.jsonl"
    elif case == "corpus":
        cfg, expect = {"corpus": str(tmp_path / "missing.raw")}, "missing.raw"
    elif case == "heldout":
        (tokenized / "test.parquet").unlink()
        expect = "test.parquet"
    elif case == "adapter_base":
        model_dir = tmp_path / "adapter"
        model_dir.mkdir()
        (model_dir / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
        expect = "gone"
    with pytest.raises(EvalInputError, match=expect):
        run_evaluation(make_recipe(tmp_path, **cfg), model_dir, tokenized, tmp_path / "eval")
    assert no_model_loading == []
    assert not (tmp_path / "run" / "base_model").exists()  # the tiny base was not even built
    assert not (tmp_path / "eval" / "eval.json").exists()


def test_adapter_folder_is_merged_on_its_base(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # B = 0 at init would make the adapter a no-op
    peft_model.save_pretrained(tmp_path / "adapter")
    src = validate_model_source(tmp_path / "adapter", role="trained model")
    assert src.kind == "adapter" and Path(src.base.name_or_path) == tiny_model_dir.resolve()

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    merged = loading.load_eval_model(src, tok, dtype="float32", device="cpu")
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tok("adapter check")["input_ids"]])
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        untouched = plain(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got - untouched).abs().max() > 1e-3
    assert not hasattr(merged, "peft_config")


def test_base_embeddings_resized_to_tokenizer(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_tokens(["<|extra_a|>", "<|extra_b|>"])
    src = validate_model_source(tiny_model_dir, role="base model")
    m1 = loading.load_eval_model(src, tok, dtype="float32", device="cpu", seed=3)
    m2 = loading.load_eval_model(src, tok, dtype="float32", device="cpu", seed=3)
    assert m1.get_input_embeddings().weight.shape[0] == len(tok) == 261
    torch.testing.assert_close(m1.get_input_embeddings().weight, m2.get_input_embeddings().weight)  # seeded


def test_hub_id_must_be_cached_when_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EvalInputError, match="not in the local Hugging Face cache"):
        validate_model_source("some-org/not-a-cached-model", role="base model")
    with pytest.raises(EvalInputError, match="does not exist"):
        validate_model_source("./runs/missing/model", role="trained model")


def test_curves_and_log_history(tmp_path):
    assert plot_curves([{"step": 1, "learning_rate": 1e-3}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    state = {"log_history": [{"step": 1, "loss": 1.0}, {"step": 2, "eval_rewards/accuracies": 0.7}]}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    hist = load_log_history(tmp_path / "trainer_state.json")
    assert hist == state["log_history"]
    assert plot_curves(hist, tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(EvalInputError, match="missing.json does not exist"):
        load_log_history(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"a": 1}')
    with pytest.raises(EvalInputError, match="expected a list"):
        load_log_history(tmp_path / "bad.json")

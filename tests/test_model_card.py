"""Model card: Hub metadata, body tables, recipe embedding, secret stripping, eval.json parsing."""

from __future__ import annotations

import re

import pytest
import yaml
from huggingface_hub import ModelCard

from orpo_core.config import recipe_from_dict
from orpo_core.evaluation.results import extract_metrics, metric_value, pick_label
from orpo_core.publish.card import (
    REDACTED,
    build_model_card,
    hub_datasets,
    render_model_card,
    strip_secrets,
)


def _recipe(**over):
    d = {
        "run_name": "card-test",
        "model": {"name_or_path": "HuggingFaceTB/SmolLM3-3B-Base"},
        "data": {
            "sources": [
                {"path": "trl-lib/ultrafeedback_binarized", "revision": "abc123"},
                {"path": "./local/pairs.jsonl"},
                {"synthetic": {"task": "arithmetic", "n_rows": 10}},
            ]
        },
        "orpo": {"beta": 0.137, "alpha": 0.9},
        "train": {"learning_rate": 3.5e-6, "per_device_train_batch_size": 3, "gradient_accumulation_steps": 5},
        "hub": {"repo_id": "someone/smol-orpo", "license": "mit"},
    }
    d.update(over)
    return recipe_from_dict(d)


# what orpo_core.evaluation.run_evaluation writes: plain values in results, details with CIs in metrics
EVAL = {
    "results": {
        "trained": {"preference/accuracy": 0.72, "perplexity/chosen": 8.5, "lm_eval/arc_easy/acc,none": 0.41},
        "base": {"preference/accuracy": 0.55, "perplexity/chosen": 9.75},
    },
    "metrics": {
        "trained": {
            "preference/accuracy": {"value": 0.72, "n": 200, "ci95": [0.66, 0.78]},
            "perplexity/chosen": {"value": 8.5, "n": 200, "ci95": None},
        }
    },
    "deltas": {"preference/accuracy": 0.17},
}


def test_extract_metrics_layouts():
    m = extract_metrics(EVAL)
    assert m["trained"]["preference/accuracy"].value == 0.72
    assert m["trained"]["preference/accuracy"].ci == (0.66, 0.78)
    assert m["trained"]["preference/accuracy"].n == 200
    assert m["base"]["perplexity/chosen"].value == 9.75
    assert "deltas" not in m
    # metric-major layout with nested value dicts
    mm = extract_metrics({"results": {"preference/accuracy": {"trained": {"value": 0.6, "ci_low": 0.5, "ci_high": 0.7}, "base": 0.4, "delta": 0.2}}})
    assert mm["trained"]["preference/accuracy"].ci == (0.5, 0.7)
    assert mm["base"]["preference/accuracy"].value == 0.4
    assert "delta" not in mm
    # nested sections are flattened with "/", non-finite values dropped
    nested = extract_metrics({"results": {"model": {"preference": {"accuracy": 0.9, "margin": float("nan")}, "lm_eval": {"piqa": {"acc": 0.6}}}}})
    assert set(nested) == {"model"} and set(nested["model"]) == {"preference/accuracy", "lm_eval/piqa/acc"}
    assert nested["model"]["preference/accuracy"].value == 0.9
    assert nested["model"]["lm_eval/piqa/acc"].value == 0.6
    assert pick_label(nested) == "model" and pick_label(nested, "base") is None
    assert metric_value(EVAL, "preference/accuracy", "base") == 0.55
    assert metric_value(EVAL, "no/such") is None


def test_strip_secrets():
    token = "hf_" + "A1b2C3d4E5f6G7h8I9j0K1"
    obj = {
        "hub": {"repo_id": "a/b", "token": "x", "hf_token": "y", "api-key": "z"},
        "model": {"tokenizer": "keep/me", "note": f"uses {token}"},
        "eval": {"corpus_max_tokens": 5, "list": ["ok", "secret-value-123"]},
        "client_secret": {"nested": 1},
    }
    out = strip_secrets(obj, secrets=["secret-value-123"])
    assert out["hub"] == {"repo_id": "a/b"}
    assert out["model"]["tokenizer"] == "keep/me"
    assert out["model"]["note"] == REDACTED
    assert out["eval"] == {"corpus_max_tokens": 5, "list": ["ok", REDACTED]}
    assert "client_secret" not in out
    assert obj["hub"]["token"] == "x"  # input untouched


def test_model_card_metadata_and_body():
    r = _recipe()
    text = render_model_card(r, EVAL, train_metrics={"train_loss": 1.25, "train_runtime": 10.0})
    card = ModelCard(text)
    data = card.data
    assert data.base_model == "HuggingFaceTB/SmolLM3-3B-Base"
    assert data.datasets == ["trl-lib/ultrafeedback_binarized"]  # local file and synthetic are not Hub datasets
    assert "orpo" in data.tags
    assert data.license == "mit"
    assert data.library_name == "transformers"
    results = {e.metric_name: e for e in data.eval_results}
    assert results["preference/accuracy"].metric_value == pytest.approx(0.72)
    assert results["preference/accuracy"].dataset_type == "trl-lib/ultrafeedback_binarized"
    assert results["lm_eval/arc_easy/acc,none"].dataset_type == "arc_easy"
    assert "preference/accuracy" in results and "perplexity/chosen" in results
    assert data.model_name == "smol-orpo"

    body = card.text
    # hyper-parameters table has the recipe's values, effective batch = 3 * 5
    assert "| orpo.beta (paper's lambda) | 0.137 |" in body
    assert "| effective batch per device (pairs) | 15 |" in body
    # metrics row: trained, CI, base and delta = 0.72 - 0.55
    row = next(line for line in body.splitlines() if line.startswith("| `preference/accuracy`"))
    assert "0.7200 [0.6600, 0.7800]" in row and "0.5500" in row and "+0.1700" in row
    ppl = next(line for line in body.splitlines() if line.startswith("| `perplexity/chosen`"))
    assert "-1.2500" in ppl
    assert "| `train_loss` | 1.25 |" in body and "train_runtime" not in body  # 4 significant digits, no padding
    # the embedded recipe parses back to the recipe
    block = re.search(r"```yaml\n(.*?)```", body, re.S).group(1)
    assert recipe_from_dict(yaml.safe_load(block)).to_dict() == r.to_dict()
    assert "2403.07691" in body


def test_model_card_tiny_adapter_no_eval():
    r = _recipe(model={"name_or_path": "tiny"}, data={"sources": [{"synthetic": {"task": "arithmetic", "n_rows": 10}}]}, peft={"method": "lora"})
    card = build_model_card(r, None, adapter_only=True)
    assert card.data.base_model is None and card.data.datasets is None
    assert card.data.eval_results is None
    assert card.data.library_name == "peft"
    assert {"orpo", "peft", "lora"} <= set(card.data.tags)
    assert "No evaluation results" in card.text
    assert "AutoPeftModelForCausalLM" in card.text
    assert "LoRA r / alpha / dropout" in card.text
    assert hub_datasets(r) == []


def test_model_card_redacts_exact_secret():
    secret = "s3cr3t-v4lue-that-is-long"
    r = _recipe(run_name=f"run-{secret}")
    text = render_model_card(r, EVAL, secrets=[secret])
    assert secret not in text

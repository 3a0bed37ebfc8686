"""Model loading (full / LoRA / QLoRA), added-token embeddings, dropout, clear errors for
unknown models, and saved adapters / merged weights that reproduce the trained model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from orpo_train_entry import build_tokenized, make_recipe


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    root = tmp_path_factory.mktemp("modeling")
    recipe = make_recipe(root / "prep", n_rows=32)
    return build_tokenized(recipe)


def _train(tmp_path, tokenized, peft: dict, **train):
    """run_training for 5 steps; returns (recipe, result, in-memory trained model)."""
    from transformers import TrainerCallback

    from orpo_core.training.run import run_training

    # bitsandbytes' CPU 4-bit inference kernel needs in_features >= its block size (64)
    model = {"tiny": {"hidden_size": 64, "intermediate_size": 128}} if peft.get("method") == "qlora" else {}
    recipe = make_recipe(
        tmp_path / "run", n_rows=32, peft=peft, model=model,
        train={"max_steps": 5, "logging_steps": 1, "learning_rate": 2e-2, **train},
    )
    holder = {}

    class Keep(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kw):
            holder["model"] = model

    result = run_training(recipe, tokenized, recipe.out_dir / "train", callbacks=[Keep()])
    return recipe, result, holder["model"]


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


def _sample_ids(tokenized):
    from orpo_core.data.tokenize import load_tokenized

    ds = load_tokenized(tokenized, "test")
    row = ds[0]
    return torch.tensor([row["prompt_input_ids"] + row["chosen_input_ids"]])


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_and_qlora_train_and_adapter_reloads_to_same_logits(tmp_path, tokenized, method):
    from peft import PeftModel

    from orpo_core.models.loading import load_model

    peft = {"method": method, "r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
    recipe, result, trained = _train(tmp_path, tokenized, peft, gradient_checkpointing=(method == "lora"))
    assert result["global_step"] == 5
    history = json.loads((recipe.out_dir / "train" / "log_history.json").read_text())
    losses = [r["loss"] for r in history if "loss" in r]
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses)
    assert math.isfinite(result["eval"]["eval_loss"])

    adapter_dir = recipe.out_dir / "train" / "adapter"
    assert (adapter_dir / "adapter_config.json").is_file() and (adapter_dir / "adapter_model.safetensors").is_file()
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["base_model_name_or_path"] == str((recipe.out_dir / "base_model").resolve())
    assert (adapter_dir / "tokenizer_config.json").is_file()

    ids = _sample_ids(tokenized)
    expected = _logits(trained, ids)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenized / "tokenizer"))
    fresh = load_model(recipe, tok, added_tokens=False, for_training=False)  # 4-bit again for qlora
    if method == "qlora":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in fresh.modules())
    reloaded = PeftModel.from_pretrained(fresh, str(adapter_dir))
    got = _logits(reloaded, ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    base_logits = _logits(load_model(recipe, tok, added_tokens=False, for_training=False), ids)
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter changed the model

    # merged full weights (LoRA: identical function; QLoRA: merged into the unquantised base)
    from transformers import AutoModelForCausalLM

    merged_dir = recipe.out_dir / "train" / "model"
    assert result["model"]["kind"] == "merged"
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
    assert getattr(merged.config, "quantization_config", None) is None
    m_logits = _logits(merged, ids)
    if method == "lora":
        torch.testing.assert_close(m_logits, expected, rtol=1e-4, atol=1e-4)
    else:
        # merged into the full-precision base: differs from the trained (4-bit) model by the
        # NF4 quantisation error only, far less than the training moved the logits
        assert torch.isfinite(m_logits).all()
        assert (m_logits - expected).abs().mean() < 0.25 * (expected - base_logits).abs().mean()


def test_adapter_only_save_when_not_merged(tmp_path, tokenized):
    recipe, result, _ = _train(tmp_path, tokenized, {"method": "lora", "r": 2}, save_merged=False, max_steps=1)
    model_dir = recipe.out_dir / "train" / "model"
    assert result["model"]["kind"] == "adapter"
    assert (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").exists()
    assert not (recipe.out_dir / "train" / "adapter").exists()


def _tok_with_new_tokens(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    n = tok.add_special_tokens({"additional_special_tokens": ["<|tool|>", "<|think|>"]})
    assert n == 2
    return tok


@pytest.mark.parametrize("method", ["none", "lora"])
def test_added_tokens_resize_embeddings_and_train_them(tmp_path, tiny_model_dir, method):
    from orpo_core.models.loading import load_model

    tok = _tok_with_new_tokens(tiny_model_dir)
    recipe = make_recipe(tmp_path / "run", model={"name_or_path": str(tiny_model_dir)}, peft={"method": method, "r": 2})
    model = load_model(recipe, tok, added_tokens=True)
    emb = model.get_input_embeddings()
    assert emb.weight.shape[0] == len(tok)
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    if method == "lora":
        from peft.utils.other import ModulesToSaveWrapper

        wrapped = [n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
        assert {w.rsplit(".", 1)[-1] for w in wrapped} == {"embed_tokens", "lm_head"}
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert any("lora_A" in n for n in trainable)
        assert any("embed_tokens" in n and "modules_to_save" in n for n in trainable)
        assert not any("q_proj.base_layer" in n for n in trainable)
    # seeded resizing: the same new rows every time
    again = load_model(recipe, tok, added_tokens=True)
    torch.testing.assert_close(again.get_input_embeddings().weight, emb.weight)
    assert model.config.pad_token_id == tok.pad_token_id


def test_dropout_disabled_by_default_and_kept_when_asked(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from orpo_core.models.loading import load_model

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    peft = {"method": "lora", "r": 2, "lora_dropout": 0.3}
    model = load_model(make_recipe(tmp_path / "a", model={"name_or_path": str(tiny_model_dir)}, peft=peft), tok, False)
    drops = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(p == 0.0 for p in drops)
    keep = make_recipe(tmp_path / "b", model={"name_or_path": str(tiny_model_dir)}, peft=peft, train={"disable_dropout": False})
    model = load_model(keep, tok, False)
    assert any(m.p == pytest.approx(0.3) for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_dtype_resolution_on_cpu():
    from orpo_core.models.loading import resolve_torch_dtype

    assert resolve_torch_dtype("auto", "cpu") is torch.float32
    assert resolve_torch_dtype("bfloat16", "cpu") is torch.bfloat16


@pytest.mark.parametrize(
    "name, pattern",
    [
        ("./no/such/model-dir", r"'\./no/such/model-dir'.*does not exist"),
        ("no-such-org-xyz/no-such-model-xyz", r"cannot load model 'no-such-org-xyz/no-such-model-xyz'"),
    ],
)
def test_unknown_model_gives_clear_error_before_training(tmp_path, tokenized, monkeypatch, name, pattern):
    from orpo_core.models.loading import ModelLoadError
    from orpo_core.training.run import run_training

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = make_recipe(tmp_path / "run", model={"name_or_path": name})
    with pytest.raises(ModelLoadError, match=pattern):
        run_training(recipe, tokenized, tmp_path / "run" / "train")
    assert not (tmp_path / "run" / "train" / "model").exists()

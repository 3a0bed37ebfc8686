"""Offline building blocks: the tiny model/tokenizer builder and the synthetic preference set."""

import torch
from safetensors.torch import load_file

from orpo_core.config import TinyModelConfig
from orpo_core.data.synthetic.arithmetic import generate_arithmetic
from orpo_core.models.tiny import build_tiny_model, build_tiny_tokenizer


def test_char_tokenizer_round_trips_any_text_and_has_chatml():
    tok = build_tiny_tokenizer("char")
    text = "Grüße, 世界! 3 + 5 = 8.\n\ttab"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id not in (None, tok.eos_token_id)


def test_tiny_model_is_deterministic_and_cached(tmp_path):
    cfg = TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    a = build_tiny_model(cfg, tmp_path / "a", seed=3)
    b = build_tiny_model(cfg, tmp_path / "b", seed=3)
    c = build_tiny_model(cfg, tmp_path / "c", seed=4)
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    build_tiny_model(cfg, tmp_path / "a", seed=3)  # same spec: not rebuilt
    assert (a / "model.safetensors").stat().st_mtime_ns == mtime


def test_synthetic_rows_are_seeded_and_correct():
    rows = generate_arithmetic(200, seed=1)
    assert rows == generate_arithmetic(200, seed=1)
    assert rows != generate_arithmetic(200, seed=2)
    for r in rows:
        assert r["prompt"][-1]["role"] == "user"
        assert r["chosen"][0]["content"] != r["rejected"][0]["content"]
        q = r["prompt"][0]["content"]
        if q.startswith("What is"):
            a, b = (int(x) for x in q[len("What is ") : -1].split(" + "))
            assert r["chosen"][0]["content"] == f"{a} + {b} = {a + b}."
        elif q.startswith("Which is larger"):
            a, b = (int(x) for x in q.split(": ")[1].rstrip("?").split(" or "))
            assert r["chosen"][0]["content"] == f"{max(a, b)}."

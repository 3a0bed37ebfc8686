"""GGUF export (orpo_core.publish.gguf) read back by transformers' GGUF loader and by llama.cpp.

A tiny random-init Llama model (tests/gguf_helpers.py) is exported as f16 and q8_0; the files
must load with ``from_pretrained(gguf_file=...)`` and give the safetensors model's logits and
greedy answers (f16: within float16 rounding), the same token ids and chat template. With
``llama-cpp-python`` installed (extra ``[llamacpp]``) llama.cpp reads the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orpo_core.publish.gguf import GGUFExportError, export_gguf, export_run_model, gguf_file_name, parse_quantizations
from orpo_core.publish.gguf_roundtrip import (
    compare_logits,
    gguf_metadata_string,
    greedy_ids,
    llama_cpp_available,
    load_gguf_transformers,
    logits_of,
    render_gguf_template,
    wilson_interval,
)
from gguf_helpers import TEXTS, build_tiny_llama

PROMPTS = [[{"role": "user", "content": t}] for t in TEXTS[:4]]
# f16 weights: |w16 - w32| <= 2^-11 |w|; through 2 layers of this random model the logits move by
# at most ~1e-2 of their scale (measured 3e-3); 2e-2 leaves room and still catches any layout error
# (a wrong RoPE permutation or norm moves them by O(1)).
F16_REL_TOL = 2e-2


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="module")
def ref(llama_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(llama_dir))


@pytest.fixture(scope="module")
def exports(llama_dir, tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("gguf")
    return {
        q: export_gguf(llama_dir, out / f"tiny.{q}.gguf", q, name="tiny-orpo", base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                       recipe_yaml="run_name: tiny-orpo\norpo: {beta: 0.1}\n", license="apache-2.0")
        for q in ("f16", "q8_0")
    }


def _texts(tok) -> list[list[int]]:
    convs = [p + [{"role": "assistant", "content": t}] for p, t in zip(PROMPTS, reversed(TEXTS))]
    return [tok.apply_chat_template(c, tokenize=True, return_dict=False) for c in convs]


def test_metadata_and_tensor_types(exports, ref):
    _, tok = ref
    f16, q8 = exports["f16"], exports["q8_0"]
    assert f16["architecture"] == "llama" and f16["tensor_types"] == {"F16": 15, "F32": 5}
    # every 2-D weight has rows of 64 = 2 blocks; the tied embedding (the lm-head too) stays f16
    assert q8["tensor_types"] == {"F16": 1, "F32": 5, "Q8_0": 14}
    assert q8["size"] < 0.9 * f16["size"]
    p = f16["path"]
    assert gguf_metadata_string(p, "general.architecture") == "llama"
    assert gguf_metadata_string(p, "tokenizer.ggml.pre") == "smollm"
    assert gguf_metadata_string(p, "tokenizer.chat_template") == tok.chat_template
    assert gguf_metadata_string(p, "general.base_model.0.repo_url") == "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"
    assert gguf_metadata_string(p, "orpo.recipe").startswith("run_name: tiny-orpo")
    from gguf import GGUFReader

    r = GGUFReader(p)
    eos = r.fields["tokenizer.ggml.eos_token_id"]
    assert int(eos.parts[eos.data[0]][0]) == tok.eos_token_id
    add_bos = r.fields["tokenizer.ggml.add_bos_token"]
    assert bool(add_bos.parts[add_bos.data[0]][0]) is False  # the tokenizer prepends no BOS
    tokens = r.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == len(tok) + 8  # padded rows named [PAD<id>]
    assert "output.weight" not in {t.name for t in r.tensors}  # tied lm-head


def test_f16_roundtrip_transformers(exports, ref):
    model, tok = ref
    gmodel, gtok = load_gguf_transformers(exports["f16"]["path"])
    seqs = _texts(tok)
    for s, text in zip(seqs, TEXTS):
        assert gtok(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert gtok.chat_template == tok.chat_template and gtok.eos_token == tok.eos_token
    cmp = compare_logits([logits_of(model, s) for s in seqs], [logits_of(gmodel, s) for s in seqs])
    assert cmp["max_abs_logit_diff"] <= F16_REL_TOL * cmp["max_abs_logit"], cmp
    assert cmp["top1_agreement"] == 1.0, cmp
    for p in PROMPTS:
        ids = tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert greedy_ids(gmodel, ids, 12, tok.eos_token_id) == greedy_ids(model, ids, 12, tok.eos_token_id)


def test_q8_0_roundtrip_transformers(exports, ref):
    model, tok = ref
    gmodel, _ = load_gguf_transformers(exports["q8_0"]["path"])
    seqs = _texts(tok)
    cmp = compare_logits([logits_of(model, s) for s in seqs], [logits_of(gmodel, s) for s in seqs])
    # 8-bit blocks: larger than f16's error, far below a layout error's
    assert cmp["max_abs_logit_diff"] <= 0.1 * cmp["max_abs_logit"], cmp
    assert cmp["top1_agreement"] >= 0.9, cmp


def _q8_0_ggml_reference(w):
    """ggml's quantize_row_q8_0_ref written out (ggml-quants.c): blocks of 32 along a row,
    d = amax / 127 (float32, stored float16), q = roundf(x * (1 / d)) (half away from zero)."""
    import numpy as np

    x = np.ascontiguousarray(w, dtype=np.float32).reshape(-1, 32)
    d = (np.abs(x).max(axis=1) / np.float32(127)).astype(np.float32)
    inv = np.where(d == 0, np.float32(0), np.float32(1) / np.where(d == 0, np.float32(1), d)).astype(np.float32)
    v = (x * inv[:, None]).astype(np.float32)
    q = (np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))).astype(np.int8)
    return np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2), q.view(np.uint8)], axis=1).reshape(-1)


def test_q8_0_blocks_equal_ggml_reference(exports, llama_dir):
    """Every Q8_0 tensor in the file holds exactly the bytes ggml's reference quantizer gives for
    the (RoPE-permuted) float32 weight; a weight with a half-way value and an all-zero block included."""
    import gguf
    import numpy as np
    from gguf import GGUFReader

    import orpo_core.publish.gguf as ge

    state = ge._load_state_dict(llama_dir)
    cfg = json.loads((llama_dir / "config.json").read_text())
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    n = 0
    for t in GGUFReader(exports["q8_0"]["path"]).tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.Q8_0:
            continue
        hf = next(k for k in state if name_map.get_name(k, try_suffixes=(".weight", ".bias")) == t.name)
        w = state[hf]
        if "q_proj" in hf:
            w = ge._permute_rope(w, cfg["num_attention_heads"])
        elif "k_proj" in hf:
            w = ge._permute_rope(w, cfg["num_key_value_heads"])
        assert np.array_equal(np.asarray(t.data).reshape(-1), _q8_0_ggml_reference(w)), t.name
        n += 1
    assert n == 14
    # ties and zeros: 0.5 d rounds away from zero (not to even), a zero block stays zero
    w = np.zeros((2, 64), dtype=np.float32)
    w[0, :32] = np.linspace(-1, 1, 32, dtype=np.float32)
    w[0, 0], w[0, 1], w[0, 2] = 127.0, 0.5, -2.5  # d = 1 exactly, so 0.5 and -2.5 are exact halves
    _, data = ge._tensor_type("blk.0.attn_v.weight", w, "q8_0")
    assert np.array_equal(np.asarray(data).reshape(-1), _q8_0_ggml_reference(w))
    q = np.asarray(data).reshape(2, 2, 34)[0, 0, 2:].view(np.int8)
    assert q[0] == 127 and q[1] == 1 and q[2] == -3
    assert not np.asarray(data).reshape(2, 2, 34)[1].any()


def test_compare_logits_figures():
    """Wilson interval, KL divergence and the near-tie gap at disagreements, on hand-made logits."""
    import numpy as np

    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(980, 1000) == pytest.approx((0.9693, 0.9870), abs=1e-4)
    with pytest.raises(ValueError, match="successes 11 not in"):
        wilson_interval(11, 10)
    ref = np.array([[3.0, 2.9, 0.0], [5.0, 1.0, 0.0], [0.0, 4.0, 1.0], [1.0, 0.0, 0.5]], dtype=np.float32)
    other = ref.copy()
    other[0] = [2.9, 3.0, 0.0]  # a near tie flipped: gap 0.1
    other[3] = [1.0, 2.0, 0.5]  # a clear change: gap 0.5 in the reference
    cmp = compare_logits([ref], [other])
    assert cmp["positions"] == 4 and cmp["disagreements"] == 2 and cmp["top1_agreement"] == 0.5
    assert cmp["top1_agreement_ci95"] == pytest.approx(list(wilson_interval(2, 4)))
    assert cmp["disagree_ref_gap"]["median"] == pytest.approx(0.3, abs=1e-6)
    assert cmp["disagree_ref_gap"]["max"] == pytest.approx(0.5, abs=1e-6)
    p = np.exp(ref[3]) / np.exp(ref[3]).sum()
    qv = np.exp(other[3]) / np.exp(other[3]).sum()
    p0 = np.exp(ref[0]) / np.exp(ref[0]).sum()
    q0 = np.exp(other[0]) / np.exp(other[0]).sum()
    kl = (p * np.log(p / qv)).sum() + (p0 * np.log(p0 / q0)).sum()
    assert cmp["kl_mean"] == pytest.approx(kl / 4, rel=1e-5)
    same = compare_logits([ref], [ref.copy()])
    assert same["kl_mean"] == 0.0 and same["disagreements"] == 0 and same["disagree_ref_gap"] is None


def test_wrong_rope_layout_is_caught(llama_dir, ref, tmp_path, monkeypatch):
    """The check above is sharp: an export without the q/k permutation gives different logits."""
    import orpo_core.publish.gguf as ge

    model, tok = ref
    monkeypatch.setattr(ge, "_permute_rope", lambda w, n: w)
    info = ge.export_gguf(llama_dir, tmp_path / "bad.gguf", "f32")
    gmodel, _ = load_gguf_transformers(info["path"])
    seqs = _texts(tok)
    cmp = compare_logits([logits_of(model, s) for s in seqs], [logits_of(gmodel, s) for s in seqs])
    assert cmp["max_abs_logit_diff"] > F16_REL_TOL * cmp["max_abs_logit"]


def test_refuses_other_architectures(tiny_model_dir, tmp_path):
    with pytest.raises(GGUFExportError, match=r"SmolLM3ForCausalLM.*smollm3.*supported: LlamaForCausalLM"):
        export_gguf(tiny_model_dir, tmp_path / "x.gguf", "f16")
    assert not list(tmp_path.iterdir())


def test_refuses_unknown_pre_tokenizer(tmp_path):
    d = build_tiny_llama(tmp_path / "m", pre="bytes")
    with pytest.raises(GGUFExportError, match=r"pre-tokenizer ByteLevel\(no-regex\) has no llama.cpp equivalent"):
        export_gguf(d, tmp_path / "x.gguf", "f16")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


def test_failed_write_leaves_no_file(llama_dir, tmp_path, monkeypatch):
    import gguf

    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(llama_dir, tmp_path / "x.gguf", "f16")
    assert list(tmp_path.iterdir()) == []


def test_parse_quantizations():
    assert parse_quantizations("F16, q8_0,f16") == ["f16", "q8_0"]
    assert gguf_file_name("smollm2 instructions", "q8_0") == "smollm2-instructions.Q8_0.gguf"
    with pytest.raises(GGUFExportError, match="unknown GGUF type 'q4_k'.*f32, f16, q8_0"):
        parse_quantizations("f16,q4_k")


def test_lora_adapter_is_merged(llama_dir, ref, tmp_path):
    """A run folder holding only an adapter (train.save_merged: false) is merged before export:
    the GGUF gives the merged model's logits, not the base model's."""
    import torch
    from peft import LoraConfig, get_peft_model

    from orpo_core.config import recipe_from_dict

    base, tok = ref
    torch.manual_seed(1)
    peft_model = get_peft_model(
        type(base).from_pretrained(str(llama_dir), dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False),
    )
    adapter = tmp_path / "train" / "model"
    peft_model.save_pretrained(adapter)
    tok.save_pretrained(adapter)
    merged = peft_model.merge_and_unload().eval()
    recipe = recipe_from_dict({
        "run_name": "lora-run", "output_dir": str(tmp_path),
        "model": {"name_or_path": str(llama_dir), "dtype": "float32"},
        "data": {"sources": [{"synthetic": {"task": "arithmetic", "n_rows": 10}}]},
        "peft": {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "train": {"save_merged": False},
    })
    infos = export_run_model(recipe, adapter, tmp_path / "gguf", ["f32"], work_dir=tmp_path)
    assert [Path(i["path"]).name for i in infos] == ["lora-run.F32.gguf"]
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == ["lora-run.F32.gguf"]  # merge folder removed
    gmodel, _ = load_gguf_transformers(infos[0]["path"])
    seqs = _texts(tok)
    to_merged = compare_logits([logits_of(merged, s) for s in seqs], [logits_of(gmodel, s) for s in seqs])
    to_base = compare_logits([logits_of(base, s) for s in seqs], [logits_of(gmodel, s) for s in seqs])
    assert to_merged["max_abs_logit_diff"] < 1e-3, to_merged
    assert to_base["max_abs_logit_diff"] > 100 * to_merged["max_abs_logit_diff"] + 1e-3


# --------------------------------------------------------------------------- llama.cpp
needs_llama_cpp = pytest.mark.skipif(llama_cpp_available() is not None, reason=str(llama_cpp_available()))


def test_chat_template_rendered_from_gguf_equals_tokenizer(exports, ref):
    """The GGUF's template rendered as llama-cpp-python does (Jinja2ChatFormatter; jinja2 when absent)."""
    _, tok = ref
    template = gguf_metadata_string(exports["q8_0"]["path"], "tokenizer.chat_template")
    for p in PROMPTS:
        for gen, conv in ((True, p), (False, p + [{"role": "assistant", "content": "Sure."}])):
            mine = render_gguf_template(template, conv, bos_token=tok.bos_token, eos_token=tok.eos_token, add_generation_prompt=gen)
            assert mine == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)


@needs_llama_cpp
def test_llama_cpp_reads_the_export(exports, ref):
    from orpo_core.publish.gguf_roundtrip import LlamaCppRunner

    model, tok = ref
    seqs = _texts(tok)
    for q, rel_tol, min_top1 in (("f16", F16_REL_TOL, 1.0), ("q8_0", 0.1, 0.9)):
        runner = LlamaCppRunner(exports[q]["path"], n_ctx=256)
        assert runner.metadata["tokenizer.chat_template"] == tok.chat_template
        for text in TEXTS:
            chat = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
            assert runner.tokenize(chat) == tok(chat, add_special_tokens=False)["input_ids"], (q, chat)
        cmp = compare_logits([logits_of(model, s) for s in seqs], [runner.logits(s) for s in seqs])
        assert cmp["max_abs_logit_diff"] <= rel_tol * cmp["max_abs_logit"], (q, cmp)
        assert cmp["top1_agreement"] >= min_top1, (q, cmp)
        if q == "f16":
            for p in PROMPTS:
                ids = tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
                assert runner.greedy(ids, 12, tok.eos_token_id) == greedy_ids(model, ids, 12, tok.eos_token_id)

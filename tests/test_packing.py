"""Padding-free packing (orpo.padding_free): the packed [1, N] layout (plain and with shared
prompts), the per-segment attention, and equality of loss, per-row log-probs and gradients
with the padded [2B, T] forward on a tiny Llama and the tiny SmolLM3 model (segment sdpa,
transformers' packed sdpa/eager masks, fused and unfused, LoRA, sliding window), plus the
prompt_sharing: auto rule and the fallbacks for unsupported models."""

from __future__ import annotations

import json

import pytest
import torch

from orpo_core.training.collator import ORPODataCollator
from orpo_core.training.packing import (
    SEGMENT_SDPA,
    SEGMENTS_KWARG,
    build_packed_batch,
    enable_segment_sdpa,
    padding_free_unsupported_reason,
    segment_sdpa_attention_forward,
)
from orpo_core.training.sharing import build_shared_batch, gather_pair_rows, layout_cost, sharing_pays
from orpo_core.training.trainer import ORPOTrainer

from layout_checks import LAYOUT_CASES, SPEC, assert_same_outputs, random_pairs, layout_trainer, loss_and_grads

_rows = random_pairs


# --------------------------------------------------------------------------- layout
def test_plain_packed_layout():
    feats = [
        {"prompt_input_ids": [1, 2, 3], "chosen_input_ids": [4, 5], "rejected_input_ids": [6]},
        {"prompt_input_ids": [7], "chosen_input_ids": [8, 9, 10], "rejected_input_ids": [11, 12]},
    ]
    b = ORPODataCollator(pad_token_id=0)(feats)
    pk = build_packed_batch(b["input_ids"], b["attention_mask"], b["completion_mask"])
    # rows: [1 2 3 4 5] [7 8 9 10] [1 2 3 6] [7 11 12], no padding
    assert pk.input_ids.tolist() == [[1, 2, 3, 4, 5, 7, 8, 9, 10, 1, 2, 3, 6, 7, 11, 12]]
    assert pk.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2]]
    assert pk.seq_lens == [5, 4, 4, 3] and not pk.shared and pk.logical_length == 5
    assert [(s.q_start, s.q_end, s.k_ranges, s.mask) for s in pk.segments] == [
        (0, 5, ((0, 5),), None), (5, 9, ((5, 9),), None), (9, 13, ((9, 13),), None), (13, 16, ((13, 16),), None)
    ]
    real = b["attention_mask"].bool()
    rebuilt = gather_pair_rows(pk.input_ids.unsqueeze(-1), pk.gather_index).squeeze(-1)
    assert torch.equal(rebuilt[real], b["input_ids"][real])
    pos = gather_pair_rows(pk.position_ids.unsqueeze(-1), pk.gather_index).squeeze(-1)
    assert torch.equal(pos[real], torch.arange(b["input_ids"].shape[1]).expand_as(real)[real])
    m = pk.dense_mask()[0, 0]
    assert m.shape == (16, 16)
    assert m[6].tolist() == [False] * 5 + [True, True] + [False] * 9  # row 2 token 1 sees its row only
    add = pk.dense_mask(torch.float32)[0, 0]
    assert (add[~m] == torch.finfo(torch.float32).min).all() and (add[m] == 0).all()


def test_shared_packed_layout_matches_the_shared_mask():
    rows = _rows(SPEC)
    b = ORPODataCollator(pad_token_id=0)(rows)
    pk = build_packed_batch(b["input_ids"], b["attention_mask"], b["completion_mask"], share_prompts=True)
    sh = build_shared_batch(b["input_ids"], b["attention_mask"], b["completion_mask"])
    lens = [p + c + r for p, c, r in SPEC]
    assert pk.shared and pk.seq_lens == lens and pk.num_tokens == sum(lens)
    # each pair's run is its shared row without padding, with the same positions and mask
    dense = pk.dense_mask()[0, 0]
    start = 0
    for k, n in enumerate(lens):
        assert torch.equal(pk.input_ids[0, start : start + n], sh.input_ids[k, :n])
        assert torch.equal(pk.position_ids[0, start : start + n], sh.position_ids[k, :n])
        assert torch.equal(dense[start : start + n, start : start + n], sh.attention_mask[k, 0, :n, :n])
        assert not dense[start : start + n, :start].any() and not dense[start : start + n, start + n :].any()
        start += n
    real = b["attention_mask"].bool()
    rebuilt = gather_pair_rows(pk.input_ids.unsqueeze(-1), pk.gather_index).squeeze(-1)
    assert torch.equal(rebuilt[real], b["input_ids"][real])


def test_packing_rejects_bad_layout():
    ids = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]])
    left_padded = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    comp = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    with pytest.raises(ValueError, match="row 0 of the pair batch is not 'prompt then completion, right padded'"):
        build_packed_batch(ids, left_padded, comp)
    with pytest.raises(ValueError, match=r"\[2B, T\] pair batch"):
        build_packed_batch(ids[:1], left_padded[:1], comp[:1])


def test_segment_attention_equals_dense_masked_sdpa():
    """Per-segment sdpa (GQA, causal rows and lower-right rejected runs) == one sdpa call with
    the equivalent dense mask, values and gradients."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows = _rows(SPEC)
    b = ORPODataCollator(pad_token_id=0)(rows)
    module = torch.nn.Module()
    module.is_causal = True
    module.num_key_value_groups = 2
    for share in (False, True):
        pk = build_packed_batch(b["input_ids"], b["attention_mask"], b["completion_mask"], share_prompts=share)
        n = pk.num_tokens
        g = torch.Generator().manual_seed(1)
        q0, k0, v0 = (torch.randn(1, h, n, 8, generator=g) for h in (4, 2, 2))
        outs = []
        for segmented in (True, False):
            q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
            if segmented:
                o, _ = segment_sdpa_attention_forward(module, q, k, v, None, **{SEGMENTS_KWARG: pk.segments})
            else:
                o, _ = sdpa_attention_forward(module, q, k, v, pk.dense_mask())
            (o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum().backward()
            outs.append((o, q.grad, k.grad, v.grad))
        for a, ref in zip(*outs):
            torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- equality with the padded forward
def _spy(tr):
    calls = []
    real_forward = tr.model.forward

    def spy(*args, **kw):
        calls.append((tuple(kw["input_ids"].shape), SEGMENTS_KWARG in kw, kw.get("attention_mask") is not None))
        return real_forward(*args, **kw)

    tr.model.forward = spy
    return calls


def _smollm3_trainer(tmp_path, tiny_model_dir, tok, dataset, *, orpo=None, **kw):
    """The tiny SmolLM3 model, padding-free on and prompt sharing off unless ``orpo`` says otherwise."""
    return layout_trainer(tmp_path, tiny_model_dir, tok, dataset,
                          orpo={"padding_free": True, "prompt_sharing": False, **(orpo or {})}, **kw)


@pytest.mark.parametrize(("attn", "fused", "peft"), LAYOUT_CASES)
def test_packed_equals_padded_smollm3(tmp_path, tiny_model_dir, tiny_tok, attn, fused, peft):
    rows = _rows(SPEC, vocab=min(len(tiny_tok), 250))
    tr = _smollm3_trainer(tmp_path, tiny_model_dir, tiny_tok, rows, attn=attn, peft=peft,
                          orpo={"fused_loss": fused}, max_steps=1)
    assert tr.padding_free and tr.use_fused == fused
    base = tr.model.get_base_model() if peft else tr.model
    assert base.config._attn_implementation == (SEGMENT_SDPA if attn == "sdpa" else "eager")
    batch = tr._prepare_inputs(ORPODataCollator(tiny_tok.pad_token_id)(rows))
    calls = _spy(tr)
    plain, g_plain = loss_and_grads(tr, batch, padding_free=False, sharing=False)
    packed, g_packed = loss_and_grads(tr, batch, padding_free=True, sharing=False)
    shared, g_shared = loss_and_grads(tr, batch, padding_free=True, sharing=True)
    n_plain = sum(2 * p + c + r for p, c, r in SPEC)
    n_shared = sum(p + c + r for p, c, r in SPEC)
    segments = attn == "sdpa"
    assert calls == [
        ((8, max(p + max(c, r) for p, c, r in SPEC)), False, True),
        ((1, n_plain), segments, False),  # plain packing: segments, or transformers' packed mask (eager)
        ((1, n_shared), segments, not segments),  # shared packing under eager: the dense 4D mask
    ]
    assert_same_outputs(packed, plain, g_packed, g_plain)
    assert_same_outputs(shared, plain, g_shared, g_plain)


def _llama(attn, **cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn, **cfg)
    return LlamaForCausalLM(config)


def _plain_trainer(tmp_path, model, **orpo):
    from transformers import TrainingArguments

    from orpo_core.config import ORPOConfig

    args = TrainingArguments(output_dir=str(tmp_path), remove_unused_columns=False, report_to=[], use_cpu=True)
    return ORPOTrainer(model=model, args=args, orpo=ORPOConfig(**orpo))


@pytest.mark.parametrize(("attn", "checkpointing"), [("sdpa", False), ("eager", False), ("sdpa", True)])
def test_packed_equals_padded_llama(tmp_path, attn, checkpointing):
    rows = _rows(SPEC)
    model = _llama(attn)
    if checkpointing:  # the segments reach the attention of recomputed layers too
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    tr = _plain_trainer(tmp_path, model, padding_free=True, prompt_sharing=False)
    batch = ORPODataCollator(0)(rows)
    plain, g_plain = loss_and_grads(tr, batch, padding_free=False, sharing=False)
    for share in (False, True):
        packed, g_packed = loss_and_grads(tr, batch, padding_free=True, sharing=share)
        assert_same_outputs(packed, plain, g_packed, g_plain)


def test_sliding_window_plain_uses_transformers_mask_and_shared_raises(tmp_path):
    """Mistral with a window shorter than the rows: plain packing leaves the (sliding) mask to
    transformers' packed-sequence detection and still equals the padded forward; sharing refuses."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=5,
                                             attn_implementation="sdpa"))
    tr = _plain_trainer(tmp_path, model, padding_free=True, prompt_sharing=False)
    rows = _rows(SPEC)
    batch = ORPODataCollator(0)(rows)
    calls = _spy(tr)
    plain, g_plain = loss_and_grads(tr, batch, padding_free=False, sharing=False)
    packed, g_packed = loss_and_grads(tr, batch, padding_free=True, sharing=False)
    assert calls[1] == ((1, sum(2 * p + c + r for p, c, r in SPEC)), False, False)
    assert_same_outputs(packed, plain, g_packed, g_plain)
    with pytest.raises(NotImplementedError, match="sliding window"):
        loss_and_grads(tr, batch, padding_free=True, sharing=True)
    tr.prompt_sharing = "auto"  # auto never shares past the window
    assert not tr.share_batch(model.config, batch)


def test_training_steps_match_padded(tmp_path, tiny_model_dir, tiny_tok):
    """Two SGD steps of 2 accumulated micro-batches: same logged losses and weights packed
    (with auto prompt sharing) and padded."""
    import datasets

    ds = datasets.Dataset.from_list(_rows(SPEC * 2, vocab=min(len(tiny_tok), 250), seed=1))
    results = []
    for pf, share in ((True, "auto"), (False, False)):
        tr = _smollm3_trainer(
            tmp_path / str(pf), tiny_model_dir, tiny_tok, ds, orpo={"padding_free": pf, "prompt_sharing": share},
            per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2, optim="sgd",
            learning_rate=0.5, max_grad_norm=0.0, lr_scheduler_type="constant", save_steps=None,
        )
        tr.train()
        logs = [r for r in tr.state.log_history if "loss" in r]
        results.append((logs, {n: p.detach().clone() for n, p in tr.model.named_parameters()}))
    (logs_a, w_a), (logs_b, w_b) = results
    assert len(logs_a) == len(logs_b) == 2
    for a, b in zip(logs_a, logs_b):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for n in w_a:
        torch.testing.assert_close(w_a[n], w_b[n], rtol=1e-4, atol=1e-6, msg=n)


# --------------------------------------------------------------------------- support and fallbacks
def test_unsupported_models_raise_or_fall_back(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    assert "model_type 'gpt2'" in padding_free_unsupported_reason(gpt2.config)
    with pytest.raises(NotImplementedError, match="orpo.padding_free: model_type 'gpt2'.*padding_free: false"):
        _plain_trainer(tmp_path, gpt2, padding_free=True, prompt_sharing=False)
    tr = _plain_trainer(tmp_path, gpt2)  # auto / auto
    assert tr.padding_free is False and tr.prompt_sharing is False
    tr = _plain_trainer(tmp_path, _llama("eager"))  # auto keeps eager padded (a dense [N, N] mask)
    assert tr.padding_free is False and tr.prompt_sharing == "auto"
    tr = _plain_trainer(tmp_path, _llama("eager"), padding_free=True)
    assert tr.padding_free is True


def test_flash_attention_kwargs():
    """flash attention gets transformers' varlen keywords (DataCollatorWithFlattening's) and no mask;
    a shared batch is refused."""
    b = ORPODataCollator(0)(_rows(SPEC))
    pk = build_packed_batch(b["input_ids"], b["attention_mask"], b["completion_mask"])
    kw = pk.model_kwargs("flash_attention_2")
    lens = [p + c for p, c, _ in SPEC] + [p + r for p, _, r in SPEC]
    assert kw["cu_seq_lens_q"].tolist() == [0] + torch.tensor(lens).cumsum(0).tolist()
    assert kw["cu_seq_lens_q"].dtype == torch.int32 and kw["max_length_k"] == max(lens)
    assert "attention_mask" not in kw and SEGMENTS_KWARG not in kw
    shared = build_packed_batch(b["input_ids"], b["attention_mask"], b["completion_mask"], share_prompts=True)
    with pytest.raises(NotImplementedError, match="flash attention only takes packed sequences"):
        shared.model_kwargs("flash_attention_2")
    with pytest.raises(NotImplementedError, match="'flex_attention'"):
        pk.model_kwargs("flex_attention")


def test_segment_sdpa_is_sdpa_without_segments_and_is_not_saved(tmp_path):
    model = _llama("sdpa")
    ids = torch.randint(0, 256, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert enable_segment_sdpa(model) and model.config._attn_implementation == SEGMENT_SDPA
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ref, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "m")
    assert SEGMENT_SDPA not in (tmp_path / "m" / "config.json").read_text()
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "llama"
    assert not enable_segment_sdpa(_llama("eager"))


def test_sharing_rule():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
    long_prompt = ([300, 200], [100, 150], [120, 90])
    tiny_prompt = ([2, 3], [300, 200], [310, 190])
    for pf in (True, False):
        assert sharing_pays(*long_prompt, padding_free=pf, config=cfg)
        assert not sharing_pays(*tiny_prompt, padding_free=pf, config=cfg)
    # padded sharing turns 2B rows of width max(P + max(C, R)) into B rows of max(P + C + R);
    # a masked padded row computes its whole width^2 attention square
    from orpo_core.training.sharing import _per_layer_costs

    lin, att = _per_layer_costs(cfg)
    assert lin == 2 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) and att == 4 * 576
    assert layout_cost([4], [3], [5], shared=False, padding_free=False, config=cfg) == 2 * 9 * lin + 2 * 81 * att
    assert layout_cost([4], [3], [5], shared=True, padding_free=False, config=cfg) == 12 * lin + 144 * att
    assert layout_cost([4], [3], [5], shared=True, padding_free=True, config=cfg) == 12 * lin + (49 / 2 + 5 * 9) * att
    assert layout_cost([4], [3], [5], shared=False, padding_free=True, config=cfg, segment_attention=False) == (
        16 * lin + 256 * att
    )

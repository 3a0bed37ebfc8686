"""Prompt sharing (orpo.prompt_sharing): the shared [prompt | chosen | rejected] layout,
its mask/positions, and equality of loss, gradients, accumulation and eval metrics with
the unshared [2B, T] forward on the tiny SmolLM3 model (sdpa and eager, fused and
unfused, LoRA); unsupported architectures fail with a clear error."""

from __future__ import annotations

import pytest
import torch

from orpo_core.training.collator import ORPODataCollator
from orpo_core.training.sharing import (
    build_shared_batch,
    check_prompt_sharing_support,
    gather_pair_rows,
    shared_pair_lengths,
)
from orpo_core.training.trainer import ORPOTrainer

from layout_checks import LAYOUT_CASES, SPEC, TRL_NAMES, random_pairs, assert_same_outputs, layout_trainer, loss_and_grads


def _rows(tok, spec, seed=0):
    """Pairs of random real tokens with the given (P, C, R) lengths."""
    return random_pairs(spec, vocab=min(len(tok), 250), seed=seed)


def _trainer(tmp_path, tiny_model_dir, tok, dataset, *, orpo=None, **kw):
    """The tiny SmolLM3 model, prompt sharing on and padding-free off unless ``orpo`` says otherwise."""
    return layout_trainer(tmp_path, tiny_model_dir, tok, dataset,
                          orpo={"prompt_sharing": True, "padding_free": False, **(orpo or {})}, **kw)


def test_shared_layout_ids_positions_mask_and_gather():
    feats = [
        {"prompt_input_ids": [1, 2, 3], "chosen_input_ids": [4, 5], "rejected_input_ids": [6]},
        {"prompt_input_ids": [7], "chosen_input_ids": [8, 9, 10], "rejected_input_ids": [11, 12]},
    ]
    b = ORPODataCollator(pad_token_id=0)(feats)
    s = build_shared_batch(b["input_ids"], b["attention_mask"], b["completion_mask"], pad_token_id=99)
    assert s.input_ids.tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]
    assert s.position_ids.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 3, 1, 2]]
    m = s.attention_mask[:, 0]
    assert m.dtype == torch.bool and m.shape == (2, 6, 6)
    # pair 0: rejected token (index 5) sees prompt 0..2 and itself, not chosen 3..4
    assert m[0, 5].tolist() == [True, True, True, False, False, True]
    assert m[0, 4].tolist() == [True, True, True, True, True, False]  # chosen: causal
    # pair 1: rejected (4, 5) see prompt 0 and rejected, not chosen 1..3
    assert m[1, 5].tolist() == [True, False, False, False, True, True]
    # gathering the shared ids rebuilds the [2B, T] ids on every real token
    rebuilt = gather_pair_rows(s.input_ids.unsqueeze(-1), s.gather_index).squeeze(-1)
    real = b["attention_mask"].bool()
    assert torch.equal(rebuilt[real], b["input_ids"][real])
    pos = gather_pair_rows(s.position_ids.unsqueeze(-1), s.gather_index).squeeze(-1)
    assert torch.equal(pos[real], torch.arange(b["input_ids"].shape[1]).expand_as(real)[real])
    assert s.logical_length == 5  # pair 0: 3 + max(2, 1)

    # padding: a shorter pair gets padded keys masked and pad ids
    feats.append({"prompt_input_ids": [1], "chosen_input_ids": [2], "rejected_input_ids": [3]})
    b = ORPODataCollator(pad_token_id=0)(feats)
    s = build_shared_batch(b["input_ids"], b["attention_mask"], b["completion_mask"], mask_dtype=torch.float32, pad_token_id=99)
    assert s.input_ids[2].tolist() == [1, 2, 3, 99, 99, 99]
    add = s.attention_mask[2, 0]
    assert add.dtype == torch.float32
    assert (add[:, 3:] == torch.finfo(torch.float32).min).all() and add[2, :3].tolist() == [0.0, add[2, 1].item(), 0.0]
    assert add[2, 1] == torch.finfo(torch.float32).min  # rejected does not see chosen


def test_shared_layout_rejects_mismatched_prompts():
    ids = torch.tensor([[1, 2, 3, 4], [1, 9, 5, 0]])
    attn = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    comp = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 0]])
    with pytest.raises(ValueError, match="pair 0 has different prompt tokens"):
        build_shared_batch(ids, attn, comp)
    with pytest.raises(ValueError, match="pair 0 has prompt length 2 in its chosen row and 1"):
        build_shared_batch(ids, attn, torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]]))


def test_unsupported_architectures_raise():
    from transformers import GPT2Config, LlamaConfig

    with pytest.raises(NotImplementedError, match="model_type 'gpt2'"):
        check_prompt_sharing_support(GPT2Config())
    cfg = LlamaConfig()
    cfg._attn_implementation = "flash_attention_2"
    with pytest.raises(NotImplementedError, match="'flash_attention_2'"):
        check_prompt_sharing_support(cfg)


def test_trainer_rejects_unsupported_model(tmp_path, tiny_tok):
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from orpo_core.config import ORPOConfig

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tiny_tok)))
    args = TrainingArguments(output_dir=str(tmp_path), remove_unused_columns=False, report_to=[], use_cpu=True)
    with pytest.raises(NotImplementedError, match="model_type 'gpt2'.*prompt_sharing: false"):
        ORPOTrainer(model=model, args=args, orpo=ORPOConfig(prompt_sharing=True))


def test_length_grouping_uses_shared_lengths(tmp_path, tiny_model_dir, tiny_tok):
    import datasets

    ds = datasets.Dataset.from_list(_rows(tiny_tok, SPEC * 4))
    ds = ds.add_column("length", [0] * len(ds))  # the unshared lengths of run_training; must be ignored
    tr = _trainer(tmp_path, tiny_model_dir, tiny_tok, ds, group_by_length=True, max_steps=1)
    sampler = tr._get_train_sampler()
    assert sampler.lengths == [p + c + r for p, c, r in SPEC * 4] == shared_pair_lengths(ds)


# --------------------------------------------------------------------------- equality with the unshared forward
@pytest.mark.parametrize(("attn", "fused", "peft"), [*LAYOUT_CASES, ("eager", False, {"method": "lora", "r": 4})])
def test_shared_forward_equals_unshared(tmp_path, tiny_model_dir, tiny_tok, attn, fused, peft):
    rows = _rows(tiny_tok, SPEC)
    tr = _trainer(tmp_path, tiny_model_dir, tiny_tok, rows, attn=attn, peft=peft, orpo={"fused_loss": fused}, max_steps=1)
    assert tr.use_fused == fused
    batch = tr._prepare_inputs(ORPODataCollator(tiny_tok.pad_token_id)(rows))
    calls = []
    real_forward = tr.model.forward

    def spy(*args, **kw):
        calls.append(kw["input_ids"].shape)
        return real_forward(*args, **kw)

    tr.model.forward = spy
    shared, g_shared = loss_and_grads(tr, batch, sharing=True)
    plain, g_plain = loss_and_grads(tr, batch, sharing=False)
    # the shared forward ran B rows of max(P + C + R); the plain one 2B rows of max(P + max(C, R))
    assert calls == [(4, max(p + c + r for p, c, r in SPEC)), (8, max(p + max(c, r) for p, c, r in SPEC))]
    assert_same_outputs(shared, plain, g_shared, g_plain)


def test_training_accumulation_and_eval_match_unshared(tmp_path, tiny_model_dir, tiny_tok):
    """Two optimizer steps of 2 accumulated micro-batches, then evaluate: same losses,
    TRL metrics, eval metrics and weights with sharing on and off."""
    import datasets

    ds = datasets.Dataset.from_list(_rows(tiny_tok, SPEC * 2, seed=1))
    results = []
    for sharing in (True, False):
        tr = _trainer(
            tmp_path / str(sharing), tiny_model_dir, tiny_tok, ds, eval_dataset=ds,
            orpo={"prompt_sharing": sharing, "beta": 0.5}, per_device_train_batch_size=2,
            per_device_eval_batch_size=3, gradient_accumulation_steps=2, max_steps=2, optim="sgd",
            learning_rate=0.5, max_grad_norm=0.0, lr_scheduler_type="constant", save_steps=None,
        )
        assert tr.prompt_sharing is sharing
        tr.train()
        ev = tr.evaluate()
        logs = [r for r in tr.state.log_history if "loss" in r]
        weights = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        results.append((logs, ev, weights))
    (logs_s, ev_s, w_s), (logs_p, ev_p, w_p) = results
    assert len(logs_s) == len(logs_p) == 2
    for a, b in zip(logs_s, logs_p):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        for k in TRL_NAMES:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    for k in ["eval_loss"] + [f"eval_{k}" for k in TRL_NAMES]:
        assert ev_s[k] == pytest.approx(ev_p[k], rel=1e-4, abs=1e-6), k
    moved = 0.0
    for n in w_s:
        torch.testing.assert_close(w_s[n], w_p[n], rtol=1e-4, atol=1e-6, msg=n)
    init = __import__("transformers").AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    moved = max(float((p.detach() - w_s[n]).abs().max()) for n, p in init.named_parameters() if n in w_s)
    assert moved > 1e-3  # the steps changed the weights

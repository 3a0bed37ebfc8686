"""ORPO trainer: collator layout, seeded length grouping, schedules, exact gradient
accumulation, fused/unfused agreement, non-finite handling, MoE aux loss, and a small
end-to-end run through run_training (loss falls, TRL metric names)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from orpo_core.training.collator import LengthGroupedPairSampler, ORPODataCollator, pair_lengths
from orpo_core.config import ScheduleConfig
from orpo_core.training.trainer import METRIC_NAMES, NonFiniteLossError, schedule_value

from layout_checks import TRL_NAMES
from orpo_train_entry import build_tokenized, hand_tokenized, make_recipe


# --------------------------------------------------------------------------- helpers
def _trainer(tmp_path, tiny_model_dir, tok, dataset, eval_dataset=None, model=None, peft=None, **train):
    """ORPOTrainer on the session tiny model (hidden 64, 2 layers) via the real
    build_training_args/load_model path."""
    from orpo_core.models.loading import load_model
    from orpo_core.training.run import build_trainer, build_training_args

    orpo = train.pop("orpo", {})
    sections = {
        "model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"},
        "train": {"group_by_length": False, "logging_steps": 1, **train},
        "orpo": orpo,
    }
    if peft:
        sections["peft"] = peft
    recipe = make_recipe(tmp_path / "run", **sections)
    if model is None:
        model = load_model(recipe, tok, added_tokens=False)
    args = build_training_args(recipe, tmp_path / "run" / "train", has_eval=eval_dataset is not None)
    return build_trainer(recipe, model, tok, args, dataset, eval_dataset, ORPODataCollator(tok.pad_token_id))


# --------------------------------------------------------------------------- collator
def test_collator_concatenates_chosen_then_rejected_with_masks():
    feats = [
        {"prompt_input_ids": [1, 2, 3], "chosen_input_ids": [4, 5], "rejected_input_ids": [6], "source": "a", "row_index": 10},
        {"prompt_input_ids": [7], "chosen_input_ids": [8, 9, 10, 11], "rejected_input_ids": [12, 13], "source": "b", "row_index": 11},
    ]
    b = ORPODataCollator(pad_token_id=0)(feats)
    assert b["input_ids"].tolist() == [
        [1, 2, 3, 4, 5],
        [7, 8, 9, 10, 11],
        [1, 2, 3, 6, 0],
        [7, 12, 13, 0, 0],
    ]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert b["completion_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 1, 0], [0, 1, 1, 0, 0]]
    assert b["row_index"].tolist() == [10, 11] and b["source"] == ["a", "b"]
    padded = ORPODataCollator(pad_token_id=99, pad_to_multiple_of=8)(feats)
    assert padded["input_ids"].shape == (4, 8)
    assert padded["input_ids"][3, 3:].tolist() == [99] * 5
    assert int(padded["attention_mask"].sum()) == int(b["attention_mask"].sum())


@pytest.mark.parametrize("field", ["prompt_input_ids", "rejected_input_ids"])
def test_collator_empty_field_names_row_and_field(field):
    row = {"prompt_input_ids": [1], "chosen_input_ids": [2], "rejected_input_ids": [3], "source": "s", "row_index": 42}
    row[field] = []
    with pytest.raises(ValueError, match=rf"row 42.*'{field}' is empty"):
        ORPODataCollator(pad_token_id=0)([row])


def test_length_grouped_sampler_is_seeded_per_epoch_and_groups_lengths():
    lengths = [int(x) for x in torch.randint(5, 200, (400,), generator=torch.Generator().manual_seed(0))]
    s = LengthGroupedPairSampler(lengths, batch_size=4, seed=3)
    e0 = list(s)
    assert sorted(e0) == list(range(400))
    assert list(LengthGroupedPairSampler(lengths, batch_size=4, seed=3)) == e0  # same seed, same order
    s.set_epoch(1)
    e1 = list(s)
    assert e1 != e0 and sorted(e1) == list(range(400))
    s.set_epoch(0)
    assert list(s) == e0
    # mega-batches of min(400 // 16, 50) * 4 = 100 are sorted by length, longest first
    for start in range(0, 400, 100):
        mb = [lengths[i] for i in e0[start + 1 : start + 100]]  # [0] may be swapped in (the global max)
        assert mb == sorted(mb, reverse=True)
    assert lengths[e0[0]] == max(lengths)
    # grouping lowers padding: summed per-batch max length below a random order's
    rand = torch.randperm(400, generator=torch.Generator().manual_seed(1)).tolist()
    pad = lambda order: sum(max(lengths[i] for i in order[k : k + 4]) for k in range(0, 400, 4))  # noqa: E731
    assert pad(e0) < 0.8 * pad(rand)


def test_pair_lengths_use_longer_completion():
    rows = [{"prompt_input_ids": [1, 2], "chosen_input_ids": [3], "rejected_input_ids": [4, 5, 6]}]
    assert pair_lengths(rows) == [5]


# --------------------------------------------------------------------------- schedules
def test_schedule_values():
    assert schedule_value(0.5, ScheduleConfig(), 0) == 0.5
    lin = ScheduleConfig(type="linear", start=0.1, warmup_steps=4)
    assert [schedule_value(0.5, lin, s) for s in (0, 2, 4, 9)] == pytest.approx([0.1, 0.3, 0.5, 0.5])
    assert schedule_value(0.5, ScheduleConfig(type="linear", start=0.0, warmup_steps=0), 0) == 0.5


def test_trainer_uses_scheduled_beta(tmp_path, tiny_model_dir, tiny_tok):
    ds = hand_tokenized(tiny_tok, 8)
    tr = _trainer(
        tmp_path, tiny_model_dir, tiny_tok, ds, per_device_train_batch_size=2, max_steps=4,
        orpo={"beta": 0.4, "beta_schedule": {"type": "linear", "start": 0.0, "warmup_steps": 2}},
    )
    seen = []
    real = tr.orpo_forward

    def spy(model, inputs, **kw):
        seen.append(kw["beta"])
        return real(model, inputs, **kw)

    tr.orpo_forward = spy
    tr.train()
    assert seen == pytest.approx([0.0, 0.2, 0.4, 0.4])
    logged = [r["beta"] for r in tr.state.log_history if "loss" in r]
    assert logged[-1] == pytest.approx(0.4)


# --------------------------------------------------------------------------- gradient accumulation
@pytest.mark.parametrize("fused", [True, False])
def test_grad_accumulation_2x1_equals_batch_2(tmp_path, tiny_model_dir, tiny_tok, fused):
    """One SGD step (lr 1, no clipping) on the same two pairs of different lengths: batch 2
    vs two micro-batches of 1 give the same update (token- and pair-weighted, not a mean of
    micro-batch means)."""
    from transformers import AutoModelForCausalLM

    ds = hand_tokenized(tiny_tok, 8, seed=3)
    lens = pair_lengths(ds)
    i, j = max(range(8), key=lambda k: lens[k]), min(range(8), key=lambda k: lens[k])
    ds = ds.select([i, j])
    assert lens[i] >= lens[j] + 3  # different token counts, so naive averaging would differ

    def run(bs, ga, sub):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        tr = _trainer(
            tmp_path / sub, tiny_model_dir, tiny_tok, ds, model=model,
            per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=1,
            optim="sgd", learning_rate=1.0, max_grad_norm=0.0, lr_scheduler_type="constant",
            orpo={"beta": 0.5, "fused_loss": fused},
        )
        tr.train()
        return {n: (before[n] - p.detach()) for n, p in model.named_parameters()}, tr.state.log_history[0]["loss"]

    full, loss_full = run(2, 1, "full")
    accum, loss_accum = run(1, 2, "accum")
    assert loss_accum == pytest.approx(loss_full, rel=1e-5)
    for name in full:
        torch.testing.assert_close(accum[name], full[name], rtol=1e-4, atol=1e-6, msg=name)
    assert max(float(g.abs().max()) for g in full.values()) > 1e-3  # the step did something


# --------------------------------------------------------------------------- fused vs unfused
@pytest.mark.parametrize("peft", [None, {"method": "lora", "r": 4, "modules_to_save": ["embed_tokens", "lm_head"]}])
def test_fused_and_unfused_forward_agree(tmp_path, tiny_model_dir, tiny_tok, peft):
    ds = hand_tokenized(tiny_tok, 4, seed=5)
    tr = _trainer(tmp_path, tiny_model_dir, tiny_tok, ds, peft=peft, max_steps=1)
    batch = tr._prepare_inputs(ORPODataCollator(tiny_tok.pad_token_id)([ds[k] for k in range(4)]))
    model = tr.model
    grads = []
    losses = []
    for fused in (True, False):
        tr.use_fused = fused
        model.zero_grad()
        out, _ = tr.orpo_forward(model, batch, beta=0.3, alpha=1.0)
        out.loss.backward()
        losses.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert tr._fused_checked
    torch.testing.assert_close(losses[0].loss, losses[1].loss, rtol=1e-5, atol=1e-6)
    for k in TRL_NAMES:
        torch.testing.assert_close(losses[0].metrics[k], losses[1].metrics[k], rtol=1e-4, atol=1e-5, msg=k)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)


# --------------------------------------------------------------------------- non-finite
def _inject_nan(tr, at_call: int):
    real = tr.orpo_forward
    calls = {"n": 0}

    def forward(model, inputs, **kw):
        out, aux = real(model, inputs, **kw)
        calls["n"] += 1
        if model.training and calls["n"] == at_call:
            out.loss = out.loss * float("nan")
        return out, aux

    tr.orpo_forward = forward


def test_nonfinite_loss_raises_with_step_and_rows(tmp_path, tiny_model_dir, tiny_tok):
    ds = hand_tokenized(tiny_tok, 12)
    tr = _trainer(tmp_path, tiny_model_dir, tiny_tok, ds, per_device_train_batch_size=2, max_steps=5)
    _inject_nan(tr, at_call=3)
    with pytest.raises(NonFiniteLossError, match=r"global step 3 .*rows \[\d+, \d+\].*sources \['synthetic:arithmetic/"):
        tr.train()


def test_nonfinite_loss_skip_counts_and_leaves_weights(tmp_path, tiny_model_dir, tiny_tok):
    """skip mode: the NaN micro-batch contributes nothing (plain SGD: weights unchanged by that
    step), training continues with finite weights and the skip is logged."""
    from transformers import TrainerCallback

    ds = hand_tokenized(tiny_tok, 12)
    tr = _trainer(
        tmp_path, tiny_model_dir, tiny_tok, ds, per_device_train_batch_size=2, max_steps=5,
        optim="sgd", learning_rate=0.5, orpo={"on_nonfinite": "skip"},
    )
    snaps = []

    class Snap(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            snaps.append(torch.cat([p.detach().flatten() for p in model.parameters()]).clone())

    tr.add_callback(Snap())
    _inject_nan(tr, at_call=3)
    tr.train()
    assert tr.skipped_nonfinite == 1
    assert torch.equal(snaps[2], snaps[1])  # step 3 (the NaN batch) changed nothing
    assert not torch.equal(snaps[3], snaps[2])  # step 4 trained again
    assert all(torch.isfinite(s).all() for s in snaps)
    logs = [r for r in tr.state.log_history if "loss" in r]
    assert logs[-1]["skipped_nonfinite"] == 1
    assert all(math.isfinite(r["loss"]) for r in logs)


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_nonfinite_gradient_raises_or_skips_the_step(tmp_path, tiny_model_dir, tiny_tok, mode):
    """A finite loss with an inf gradient (injected by a hook on one weight at step 2)."""
    ds = hand_tokenized(tiny_tok, 12)
    tr = _trainer(
        tmp_path, tiny_model_dir, tiny_tok, ds, per_device_train_batch_size=2, max_steps=4,
        optim="sgd", learning_rate=0.5, orpo={"on_nonfinite": mode},
    )
    weight = tr.model.model.layers[0].mlp.up_proj.weight
    calls = {"n": 0}

    def hook(grad):
        calls["n"] += 1
        return grad * float("inf") if calls["n"] == 2 else grad

    weight.register_hook(hook)
    if mode == "raise":
        with pytest.raises(NonFiniteLossError, match=r"non-finite gradient norm .* global step 2"):
            tr.train()
        return
    tr.train()
    assert tr.skipped_nonfinite == 1 and tr.state.global_step == 4
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())


# --------------------------------------------------------------------------- MoE aux loss
def test_moe_router_aux_loss_is_added(tmp_path, tiny_tok):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=len(tiny_tok), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        router_aux_loss_coef=0.02, pad_token_id=tiny_tok.pad_token_id, max_position_embeddings=128,
    )
    model = MixtralForCausalLM(cfg)
    ds = hand_tokenized(tiny_tok, 4)
    tr = _trainer(tmp_path, "unused", tiny_tok, ds, model=model, max_steps=1)
    assert tr.aux_enabled and tr.aux_coef == pytest.approx(0.02)
    batch = tr._prepare_inputs(ORPODataCollator(tiny_tok.pad_token_id)([ds[k] for k in range(4)]))
    model.train()
    out, aux = tr.orpo_forward(model, batch, beta=0.1, alpha=1.0)
    assert aux is not None and float(aux.detach()) > 0
    total = tr.compute_loss(model, batch)
    assert float(total.detach()) == pytest.approx(float(out.loss.detach()) + 0.02 * float(aux.detach()), rel=1e-5)
    tr._stored["train"].clear()


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory):
    from orpo_core.training.run import run_training

    root = tmp_path_factory.mktemp("e2e")
    recipe = make_recipe(
        root / "run", n_rows=96,
        train={"max_steps": 30, "logging_steps": 3, "eval_steps": 15, "learning_rate": 5e-3,
               "per_device_train_batch_size": 8, "warmup_steps": 2},
    )
    tokenized = build_tokenized(recipe)
    result = run_training(recipe, tokenized, recipe.out_dir / "train")
    return recipe, tokenized, result


def test_training_loss_falls_and_metrics_have_trl_names(e2e_run):
    recipe, _, result = e2e_run
    out = recipe.out_dir / "train"
    history = json.loads((out / "log_history.json").read_text())
    train_logs = [r for r in history if "loss" in r]
    eval_logs = [r for r in history if "eval_loss" in r]
    assert len(train_logs) >= 8 and len(eval_logs) >= 2
    first = sum(r["loss"] for r in train_logs[:2]) / 2
    last = sum(r["loss"] for r in train_logs[-2:]) / 2
    assert last < first - 0.3, (first, last)
    assert eval_logs[-1]["eval_loss"] < eval_logs[0]["eval_loss"]
    for r in train_logs:
        assert set(TRL_NAMES) <= set(r), set(TRL_NAMES) - set(r)
        assert r["skipped_nonfinite"] == 0
    for r in eval_logs:
        assert {f"eval_{k}" for k in TRL_NAMES} <= set(r)
    # NLL is the dominant term at beta 0.1: logged loss ~ nll + beta * -log_odds_ratio
    r = train_logs[-1]
    assert r["loss"] == pytest.approx(r["nll_loss"] - 0.1 * r["log_odds_ratio"], rel=0.05)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 30 and metrics["eval"]["eval_loss"] == pytest.approx(eval_logs[-1]["eval_loss"])
    assert "eval_rewards/accuracies" in metrics["eval"] and "train_loss" in metrics["train"]
    assert result["model"]["kind"] == "full"


def test_final_model_folder_loads_with_tokenizer_and_template(e2e_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe, tokenized, _ = e2e_run
    model_dir = recipe.out_dir / "train" / "model"
    assert any(model_dir.glob("*.safetensors"))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    base = AutoModelForCausalLM.from_pretrained(str(recipe.out_dir / "base_model"))
    w, w0 = model.get_input_embeddings().weight, base.get_input_embeddings().weight
    assert w.shape == w0.shape and not torch.equal(w, w0)  # trained weights, not the base


def test_run_training_rejects_mismatched_tokenizer_and_missing_columns(e2e_run, tmp_path):
    import shutil

    import pyarrow.parquet as pq

    from orpo_core.models.tiny import build_tiny_tokenizer
    from orpo_core.training.run import TrainInputError, run_training

    recipe, tokenized, _ = e2e_run
    bad = tmp_path / "tok"
    shutil.copytree(tokenized, bad)
    shutil.rmtree(bad / "tokenizer")
    other = build_tiny_tokenizer("char")
    other.add_tokens(["<extra>"])
    other.save_pretrained(str(bad / "tokenizer"))
    with pytest.raises(TrainInputError, match="tokenizer mismatch"):
        run_training(recipe, bad, tmp_path / "out")

    bad2 = tmp_path / "tok2"
    shutil.copytree(tokenized, bad2)
    table = pq.read_table(bad2 / "train.parquet").drop(["rejected_input_ids"])
    pq.write_table(table, bad2 / "train.parquet")
    with pytest.raises(ValueError, match=r"train\.parquet.*rejected_input_ids"):
        run_training(recipe, bad2, tmp_path / "out")
    assert not (tmp_path / "out" / "model").exists()


def test_metric_names_constant_matches_loss_output():
    from orpo_core.training.loss import orpo_loss_from_logits

    logits = torch.randn(2, 4, 7)
    ids = torch.randint(0, 7, (2, 4))
    mask = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    out = orpo_loss_from_logits(logits, ids, torch.ones_like(ids), mask, beta=0.1)
    assert set(out.metrics) == set(TRL_NAMES)
    assert set(TRL_NAMES) <= set(METRIC_NAMES)

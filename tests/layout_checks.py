"""Shared by the batch-layout tests (``test_packing.py``, ``test_prompt_sharing.py``): a trainer
on the tiny model with a given ``orpo`` section, one forward + backward in a chosen layout, and
the equality check of two layouts' loss, per-row log-probs, TRL metrics and gradients."""

from __future__ import annotations

import torch

from orpo_core.training.collator import ORPODataCollator

from orpo_train_entry import make_recipe

#: TRL's ORPOTrainer metric names (trl.experimental.orpo), without the train/eval prefix
TRL_NAMES = [
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
    "logps/rejected", "logits/chosen", "logits/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen",
]


def layout_trainer(tmp_path, model_dir, tok, dataset, *, orpo, attn="sdpa", peft=None, eval_dataset=None, **train):
    """An :class:`ORPOTrainer` on ``model_dir`` (float32, ``attn``) with the ``orpo`` section given
    and ``train`` settings over ``group_by_length: False, logging_steps: 1``."""
    from orpo_core.models.loading import load_model
    from orpo_core.training.run import build_trainer, build_training_args

    sections = {
        "model": {"name_or_path": str(model_dir), "dtype": "float32", "attn_implementation": attn},
        "train": {"group_by_length": False, "logging_steps": 1, **train},
        "orpo": orpo,
    }
    if peft:
        sections["peft"] = peft
    recipe = make_recipe(tmp_path / "run", **sections)
    model = load_model(recipe, tok, added_tokens=False)
    args = build_training_args(recipe, tmp_path / "run" / "train", has_eval=eval_dataset is not None)
    return build_trainer(recipe, model, tok, args, dataset, eval_dataset, ORPODataCollator(tok.pad_token_id))


def loss_and_grads(tr, batch, *, sharing, padding_free=None):
    """``(ORPOLossOutput, {param name: grad})`` of one forward + backward of ``batch`` with the
    trainer's layout set to ``sharing`` (and ``padding_free`` unless None), beta 0.3, alpha 1."""
    model = tr.model
    if padding_free is not None:
        tr.padding_free = padding_free
    tr.prompt_sharing = sharing
    model.zero_grad()
    out, _ = tr.orpo_forward(model, batch, beta=0.3, alpha=1.0)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_same_outputs(a, b, grads_a, grads_b, tol=1e-5):
    """Loss, per-row log-probs and TRL metrics within ``tol`` relative; every gradient within
    ``tol`` of the largest entry of its reference gradient ``grads_b``."""
    torch.testing.assert_close(a.loss, b.loss, rtol=tol, atol=0.0)
    torch.testing.assert_close(a.chosen_logps, b.chosen_logps, rtol=tol, atol=0.0)
    torch.testing.assert_close(a.rejected_logps, b.rejected_logps, rtol=tol, atol=0.0)
    for k in TRL_NAMES:
        torch.testing.assert_close(a.metrics[k], b.metrics[k], rtol=tol, atol=1e-6, msg=k)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n in grads_a:
        scale = float(grads_b[n].abs().max())
        err = float((grads_a[n] - grads_b[n]).abs().max())
        assert err <= tol * max(scale, 1e-6), f"{n}: max |diff| {err:.3g} vs max |grad| {scale:.3g}"


#: (attn_implementation, fused loss, peft) cases under which a batch layout must equal the padded forward
LAYOUT_CASES = [
    ("sdpa", True, None),
    ("sdpa", False, None),
    ("eager", True, None),
    ("sdpa", True, {"method": "lora", "r": 4, "modules_to_save": ["embed_tokens"]}),
]

#: (prompt, chosen, rejected) lengths: different P, C, R, so every layout pads somewhere
SPEC = [(3, 9, 2), (12, 1, 7), (6, 4, 4), (1, 3, 10)]


def random_pairs(spec, vocab=250, seed=0):
    """Tokenized pair rows of random ids in ``[3, vocab)`` with the given (P, C, R) lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (p, c, r) in enumerate(spec):
        ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
        out.append({"prompt_input_ids": ids(p), "chosen_input_ids": ids(c), "rejected_input_ids": ids(r),
                    "source": "s", "row_index": i})
    return out

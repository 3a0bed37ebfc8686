"""Greedy answers to a few fixed prompts, for a side-by-side look at base vs trained."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PromptSpec:
    """A prompt to answer: display text and the token ids fed to ``generate``
    (chat template applied, ending with the assistant generation prompt)."""

    text: str
    input_ids: list[int]
    source: str  # "eval.prompts" or "held-out row <i>"


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a single user turn through the tokenizer's chat template with the
    generation prompt (transformers 5 returns a BatchEncoding; we take ``input_ids``)."""
    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    ids = enc["input_ids"]
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return list(ids)


def build_prompts(tokenizer, prompts: list[str], heldout_prompt_ids: list[list[int]], n_heldout: int) -> list[PromptSpec]:
    """``eval.prompts`` through the chat template, or else the first ``n_heldout``
    held-out prompts exactly as tokenized for training (display text decoded
    without special tokens)."""
    if prompts:
        return [PromptSpec(p, chat_prompt_ids(tokenizer, p), "eval.prompts") for p in prompts]
    out = []
    for i, ids in enumerate(heldout_prompt_ids[:n_heldout]):
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        out.append(PromptSpec(text, list(ids), f"held-out row {i}"))
    return out


def generate_answers(model, tokenizer, prompts: list[PromptSpec], *, max_new_tokens: int) -> list[str]:
    """Greedy completion of each prompt (one at a time: no padding effects), decoded
    without special tokens (whitespace kept). Stops at the tokenizer's end-of-turn
    (``eos``) token or after ``max_new_tokens`` tokens."""
    import torch

    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    answers = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for p in prompts:
                ids = torch.tensor([p.input_ids], dtype=torch.long, device=device)
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    eos_token_id=eos,
                    pad_token_id=pad,
                )
                answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return answers

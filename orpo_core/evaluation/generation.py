"""Greedy answers: a few fixed prompts side by side (base vs trained), and batched generation
for the instruction-following evaluation."""

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


def _greedy(model, input_ids, attention_mask, max_new_tokens: int, eos, pad: int):
    """``model.generate`` with greedy decoding (sampling options unset so the model's
    ``generation_config`` cannot turn sampling on); ``input_ids`` / ``attention_mask``
    ``[batch, seq]`` int64; returns ``[batch, seq + new]`` int64."""
    greedy = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                          eos_token_id=eos, pad_token_id=pad, **greedy)


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
                out = _greedy(model, ids, torch.ones_like(ids), max_new_tokens, eos, pad)
                answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return answers


def generate_batched(
    model, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int, batch_size: int = 8
) -> list[str]:
    """Greedy completions of many prompts, ``batch_size`` at a time, left padded.

    Prompts are sorted by length (less padding) and the answers returned in the
    input order. Left padding with an attention mask gives the same greedy tokens
    as unpadded generation up to floating-point noise (transformers derives the
    position ids from the mask). Generation stops at the tokenizer's ``eos`` and
    the model's ``generation_config.eos_token_id``(s) or after ``max_new_tokens``.

    Args:
        prompt_ids: token ids per prompt (chat template applied, ending with the
            assistant generation prompt), e.g. from :func:`chat_prompt_ids`.

    Returns:
        the decoded completions (special tokens skipped, whitespace kept), one per prompt.
    """
    import torch

    if not prompt_ids:
        return []
    device = next(model.parameters()).device
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gc_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos |= set(gc_eos) if isinstance(gc_eos, (list, tuple)) else ({gc_eos} if gc_eos is not None else set())
    eos_ids = sorted(eos) or None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    answers: list[str] = [""] * len(prompt_ids)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                width = max(len(prompt_ids[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    p = prompt_ids[i]
                    ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
                    mask[row, width - len(p) :] = 1
                out = _greedy(model, ids.to(device), mask.to(device), max_new_tokens, eos_ids, pad)
                for row, i in enumerate(idx):
                    new = out[row, width:].tolist()
                    if eos_ids:  # cut at the first end token (later positions are padding)
                        cut = next((k for k, t in enumerate(new) if t in eos), len(new))
                        new = new[:cut]
                    answers[i] = tokenizer.decode(new, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return answers

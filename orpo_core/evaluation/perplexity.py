"""Corpus perplexity with a sliding window (transformers "Perplexity of fixed-length
models" guide, https://huggingface.co/docs/transformers/perplexity).

The corpus is tokenized once (the tokenizer's default special tokens, as in the
guide) and capped at ``max_tokens``. Windows of ``window`` tokens start every
``stride`` tokens; in each window only the tokens not already scored by the
previous window are targets (the last ``end - prev_end`` positions), the rest are
context. Every token except the very first is scored exactly once when
``stride < window``. Perplexity is ``exp(sum NLL / number of scored tokens)``
(token-weighted). The guide multiplies each window's mean loss by
``valid targets - 1`` to account for the label shift; that is exact for the first
window only (later windows start with context positions, so the shift drops a
context position, not a target). Here each window's summed NLL and its exact
number of shifted targets are accumulated instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EvalInputError


@dataclass(frozen=True)
class Window:
    """One sliding window: tokens ``[begin, end)``, the last ``n_targets`` of which are scored."""

    begin: int
    end: int
    n_targets: int


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    """The guide's windows over ``n_tokens`` tokens.

    Raises:
        ValueError: ``window < 2`` or ``stride < 1``.
    """
    if window < 2 or stride < 1:
        raise ValueError(f"window must be >= 2 and stride >= 1, got window={window}, stride={stride}")
    out = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        out.append(Window(begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return out


def read_corpus(path: str | Path) -> str:
    """Read a UTF-8 text corpus.

    Raises:
        EvalInputError: missing file, not UTF-8, or empty.
    """
    p = Path(path)
    if not p.is_file():
        raise EvalInputError(f"corpus file {p} does not exist (eval.corpus)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EvalInputError(f"corpus file {p} is not UTF-8 ({e})") from None
    if not text.strip():
        raise EvalInputError(f"corpus file {p} is empty")
    return text


def tokenize_corpus(tokenizer, text: str, max_tokens: int | None = None) -> list[int]:
    """Token ids of ``text`` (tokenizer defaults, as the guide), first ``max_tokens`` kept.

    With a cap, only a growing character prefix is tokenized (8 characters per wanted
    token, doubled until it yields ``max_tokens + 64`` tokens or covers the text), so a
    large corpus is not tokenized whole. The 64-token slack keeps the kept tokens
    identical to those of the whole text (only the pre-token cut at the prefix end
    can differ).
    """
    if not max_tokens:
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])
    n_chars = max_tokens * 8
    while True:
        prefix = text[:n_chars]
        ids = tokenizer(prefix, add_special_tokens=True)["input_ids"]
        if len(prefix) == len(text) or len(ids) >= max_tokens + 64:
            return list(ids[:max_tokens])
        n_chars *= 2


def corpus_perplexity(
    model,
    input_ids: list[int],
    *,
    window: int,
    stride: int,
    batch_size: int = 8,
    device=None,
) -> dict[str, Any]:
    """Sliding-window perplexity of a token sequence.

    Args:
        model: causal LM returning ``.logits``.
        input_ids: the corpus token ids (length N >= 2).
        window: tokens per forward pass (clamped to N).
        stride: window step; must be <= ``window`` (otherwise tokens would be skipped).
        batch_size: windows of equal length per forward pass.

    Returns:
        ``{"value": exp(nll_sum / tokens_scored), "nll_mean", "tokens_scored",
        "tokens", "window", "stride", "n_windows"}`` (nats for ``nll_mean``).

    Raises:
        ValueError: fewer than 2 tokens, or ``stride > window``.
    """
    import torch

    from orpo_core.training.loss import completion_logps

    n = len(input_ids)
    if n < 2:
        raise ValueError(f"corpus has {n} token(s); perplexity needs at least 2")
    if stride > window:
        raise ValueError(f"stride ({stride}) must be <= window ({window}) or tokens are skipped")
    window = min(window, n)
    windows = sliding_windows(n, window, stride)
    device = device or next(model.parameters()).device
    ids = torch.tensor(input_ids, dtype=torch.long)
    nll_sum, scored = 0.0, 0
    # group windows of equal length (all but possibly the last) into batches
    groups: dict[int, list[Window]] = {}
    for w in windows:
        groups.setdefault(w.end - w.begin, []).append(w)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for length, ws in groups.items():
                for start in range(0, len(ws), batch_size):
                    chunk = ws[start : start + batch_size]
                    batch = torch.stack([ids[w.begin : w.end] for w in chunk])
                    labels = batch.clone()
                    for i, w in enumerate(chunk):
                        labels[i, : length - w.n_targets] = -100
                    logits = model(input_ids=batch.to(device)).logits
                    sums = completion_logps(logits, labels.to(device), average=False)
                    nll_sum -= float(sums.double().sum())
                    scored += int((labels[:, 1:] != -100).sum())
                    del logits
    finally:
        model.train(was_training)
    import math

    mean = nll_sum / scored
    return {
        "value": math.exp(mean),
        "nll_mean": mean,
        "tokens_scored": scored,
        "tokens": n,
        "window": window,
        "stride": stride,
        "n_windows": len(windows),
    }

"""Temperature + top-k + top-p (nucleus) sampling for ``model.generate``, drawn over the top k only.

transformers samples by warping the full-vocabulary logits (``TemperatureLogitsWarper`` ->
``TopKLogitsWarper`` -> ``TopPLogitsWarper``, ``transformers/generation/logits_process.py``) and
drawing with ``torch.multinomial`` over the whole vocabulary. On a CPU that costs more than the
model's decoding step itself for a 135M model with a 49,152-token vocabulary: measured on
SmolLM2-135M (bf16 weights, batch 64, 2 cores, AMD EPYC), the top-p warper's full ``sort`` took
20 ms and ``multinomial``'s ``exponential_`` over 64 x 49,152 probabilities 59 ms of a 205 ms step
(greedy: 118 ms).

With top-k on (transformers' default ``top_k=50`` applies whenever ``do_sample=True`` and the
model sets none), every token outside the top k has probability 0, so the same distribution is
computed exactly on k values: top k of the temperature-scaled logits, softmax over them, top-p cut
on their descending cumulative sum (a token stays when the mass *before* it is < ``top_p``, which
is ``TopPLogitsWarper``'s ``cumulative_probs <= 1 - top_p`` removal read from the other end; the
most likely token always stays), one draw. :class:`TopKNucleusSampler` does this as a
``LogitsProcessor`` that returns scores that are ``-inf`` everywhere but the drawn token, so
``generate(do_sample=False, logits_processor=[sampler])`` emits the sample (greedy picks it) and
keeps everything else of transformers' loop (KV cache, stopping, padding of finished rows).
Ties at the k-th logit are the one difference: ``TopKLogitsWarper`` keeps every token tied with
the k-th value, this keeps exactly k.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

__all__ = ["TopKNucleusSampler"]


class TopKNucleusSampler(LogitsProcessor):
    """A ``transformers`` logits processor that samples the next token (temperature, top-k, top-p).

    Args:
        temperature: > 0; logits are divided by it (``TemperatureLogitsWarper``).
        top_p: in (0, 1]; nucleus mass (``TopPLogitsWarper``; 1.0 keeps the top k).
        top_k: >= 1; candidates per step (transformers' default 50).
        generator: optional ``torch.Generator`` for the draws (default: torch's global one, so
            ``torch.manual_seed`` makes a run reproducible on one machine).

    Raises:
        ValueError: an argument outside its range.
    """

    def __init__(self, temperature: float, top_p: float, top_k: int = 50, generator: torch.Generator | None = None):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.temperature, self.top_p, self.top_k, self.generator = float(temperature), float(top_p), int(top_k), generator

    def distribution(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampling distribution restricted to its support.

        Args:
            scores: ``(batch, vocab)`` next-token logits, any float dtype.

        Returns:
            ``(probs, token_ids)``: both ``(batch, min(top_k, vocab))``, ``probs`` float32 summing
            to 1 per row (0 for tokens cut by top-p), ``token_ids`` int64 vocabulary ids in
            descending logit order.
        """
        vals, ids = torch.topk(scores.float() / self.temperature, min(self.top_k, scores.shape[-1]), dim=-1)
        probs = torch.softmax(vals, dim=-1)
        if self.top_p >= 1.0:  # no cut (generate adds no top-p warper either)
            return probs, ids
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the more likely tokens
        keep = before < self.top_p
        keep[..., 0] = True
        probs = probs * keep
        return probs / probs.sum(dim=-1, keepdim=True), ids

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Draw one token per row; return ``scores``-shaped logits, 0 at the drawn token and ``-inf`` elsewhere."""
        probs, ids = self.distribution(scores)
        drawn = ids.gather(-1, torch.multinomial(probs, 1, generator=self.generator))
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, drawn, 0.0)

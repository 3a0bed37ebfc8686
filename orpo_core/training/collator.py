"""Batching of tokenized preference pairs for the ORPO trainer.

Input rows are the tokenized dataset of ``orpo_core.data.tokenize`` (one row per
pair): ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids`` (lists
of ints; chosen/rejected are the completion tokens only) and optionally
``source`` (string) and ``row_index`` (int, the row's position in its split, added
by :func:`orpo_core.training.run.run_training` so errors can name the batch's rows).

:class:`ORPODataCollator` builds the concatenated pair batch shared with
:mod:`orpo_core.training.loss` / :mod:`orpo_core.training.fused`: ``B`` pairs become one ``[2B, T]``
tensor whose rows ``0..B-1`` are ``prompt + chosen`` and rows ``B..2B-1`` are
``prompt + rejected``, right padded (TRL ``ORPOTrainer.concatenated_inputs`` builds
the same layout from separately padded chosen/rejected tensors).

:class:`LengthGroupedPairSampler` orders pairs so that a batch holds pairs of
similar length (less padding), following transformers' ``LengthGroupedSampler``
(``get_length_grouped_indices``: random permutation, split into mega-batches of
``mega_batch_mult`` batches, each sorted by length, the longest batch first), but
with a generator seeded from ``seed + epoch`` so every process of a distributed
run and every resumed run draws the same order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Sampler

__all__ = [
    "ORPODataCollator",
    "LengthGroupedPairSampler",
    "pair_length",
    "pair_lengths",
    "REQUIRED_COLUMNS",
]

REQUIRED_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")


def pair_length(row: dict[str, Any]) -> int:
    """Length in tokens of the longer of a pair's two rows:
    ``len(prompt) + max(len(chosen), len(rejected))`` (the padded width it needs)."""
    return len(row["prompt_input_ids"]) + max(len(row["chosen_input_ids"]), len(row["rejected_input_ids"]))


def pair_lengths(dataset) -> list[int]:
    """:func:`pair_length` of every row of a ``datasets.Dataset`` (or a list of row dicts)."""
    if hasattr(dataset, "column_names"):
        prompts = dataset["prompt_input_ids"]
        chosen = dataset["chosen_input_ids"]
        rejected = dataset["rejected_input_ids"]
        return [len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected)]
    return [pair_length(row) for row in dataset]


def _describe(feature: dict[str, Any], position: int) -> str:
    parts = []
    if "row_index" in feature:
        parts.append(f"row {feature['row_index']}")
    else:
        parts.append(f"batch position {position}")
    if feature.get("source") is not None:
        parts.append(f"source {feature['source']!r}")
    return ", ".join(parts)


@dataclass
class ORPODataCollator:
    """Pad a list of tokenized pairs into one concatenated ``[2B, T]`` batch.

    Args:
        pad_token_id: id written into padding positions (never a target: the masks
            are 0 there).
        pad_to_multiple_of: round ``T`` up to a multiple of this (8 helps tensor cores on
            CUDA); None: pad to the longest row.

    Call with a list of ``B`` row dicts; returns a dict with

    * ``input_ids`` ``[2B, T]`` int64: rows ``0..B-1`` ``prompt + chosen``, ``B..2B-1``
      ``prompt + rejected``, right padded with ``pad_token_id``;
    * ``attention_mask`` ``[2B, T]`` int64, 1 on real tokens;
    * ``completion_mask`` ``[2B, T]`` int64, 1 on the completion tokens (aligned with
      ``input_ids``; the loss shifts internally);
    * ``row_index`` ``[B]`` int64 (when the rows carry it) and ``source`` (list of ``B``
      strings, when the rows carry it), used to name the batch in errors.

    Raises:
        ValueError: a row lacks one of the token columns, has an empty prompt (the
            first completion token would have no predecessor) or an empty chosen/rejected
            completion; the message names the row (``row_index``/``source`` when present).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if self.pad_token_id is None:
            raise ValueError("ORPODataCollator needs a pad_token_id (the tokenizer has no pad token)")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of <= 0:
            raise ValueError(f"pad_to_multiple_of must be > 0, got {self.pad_to_multiple_of}")

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("ORPODataCollator got an empty list of rows")
        rows: list[list[int]] = []
        starts: list[int] = []
        for half in ("chosen_input_ids", "rejected_input_ids"):
            for pos, f in enumerate(features):
                missing = [c for c in REQUIRED_COLUMNS if c not in f]
                if missing:
                    raise ValueError(f"tokenized pair ({_describe(f, pos)}) lacks column(s) {missing}")
                prompt = list(f["prompt_input_ids"])
                completion = list(f[half])
                if not prompt:
                    raise ValueError(f"tokenized pair ({_describe(f, pos)}): field 'prompt_input_ids' is empty")
                if not completion:
                    raise ValueError(f"tokenized pair ({_describe(f, pos)}): field '{half}' is empty")
                rows.append(prompt + completion)
                starts.append(len(prompt))
        width = max(len(r) for r in rows)
        m = self.pad_to_multiple_of
        if m:
            width = -(-width // m) * m
        n = len(rows)
        input_ids = torch.full((n, width), int(self.pad_token_id), dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        completion_mask = torch.zeros((n, width), dtype=torch.long)
        for i, (row, start) in enumerate(zip(rows, starts)):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
            completion_mask[i, start : len(row)] = 1
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "completion_mask": completion_mask,
        }
        if all("row_index" in f for f in features):
            batch["row_index"] = torch.tensor([int(f["row_index"]) for f in features], dtype=torch.long)
        if all("source" in f for f in features):
            batch["source"] = [str(f["source"]) for f in features]
        return batch


def _length_grouped_indices(lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[int]:
    """transformers' ``get_length_grouped_indices`` (trainer_pt_utils.py) with an explicit generator."""
    mega_batch_mult = min(len(lengths) // (batch_size * 4), 50)
    if mega_batch_mult == 0:
        mega_batch_mult = 1
    indices = torch.randperm(len(lengths), generator=generator).tolist()
    mega = mega_batch_mult * batch_size
    megabatches = [indices[i : i + mega] for i in range(0, len(lengths), mega)]
    megabatches = [sorted(mb, key=lambda i: lengths[i], reverse=True) for mb in megabatches]
    # the longest element first, so an out-of-memory error happens at once rather than late
    max_idx = max(range(len(megabatches)), key=lambda k: lengths[megabatches[k][0]])
    megabatches[0][0], megabatches[max_idx][0] = megabatches[max_idx][0], megabatches[0][0]
    return [i for mb in megabatches for i in mb]


class LengthGroupedPairSampler(Sampler[int]):
    """Seeded length-grouped ordering of pair indices (one epoch per ``set_epoch``).

    Args:
        lengths: token length of each pair (see :func:`pair_lengths`).
        batch_size: pairs per optimizer step over all processes
            (``per_device_batch * grad_accum * world_size``); mega-batches hold
            ``min(len // (4 * batch_size), 50)`` such batches, as in transformers.
        seed: base seed; epoch ``e`` uses ``torch.Generator().manual_seed(seed + e)``, so
            the order is a pure function of ``(seed, epoch)`` (identical on every process
            and after a resume).

    Raises:
        ValueError: empty ``lengths`` or ``batch_size < 1``.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0) -> None:
        if len(lengths) == 0:
            raise ValueError("LengthGroupedPairSampler needs at least one length")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = [int(x) for x in lengths]
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order :meth:`__iter__` yields (called by Trainer/accelerate)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(_length_grouped_indices(self.lengths, self.batch_size, gen))

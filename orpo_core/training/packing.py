"""Padding-free training: a pair batch packed into one row without pad tokens (``orpo.padding_free``).

The plain ORPO batch (:mod:`orpo_core.training.collator`) is ``[2B, T]`` and right padded to the
longest row; on UltraFeedback at ``max_length`` 512 and 2 pairs per batch about 29 % of the
positions the model computes are padding. :func:`build_packed_batch` concatenates the real
tokens of the batch into ONE ``[1, N]`` row (``N`` = number of real tokens) and describes
which keys each query may see as a list of :class:`AttentionSegment`:

* **plain** (``share_prompts=False``): the ``2B`` rows ``prompt + chosen`` /
  ``prompt + rejected`` one after the other; position ids restart at 0 for every row and a
  row's tokens attend causally to their own row only (block-diagonal causal attention).
* **shared** (``share_prompts=True``, :mod:`orpo_core.training.sharing`): one ``[prompt | chosen |
  rejected]`` run per pair; chosen tokens attend causally to ``prompt + chosen``, rejected
  tokens to the pair's prompt and causally to ``rejected``; positions ``0..P-1``,
  ``P..P+C-1``, ``P..P+R-1``. Each prompt is computed once and nothing is padded.

After the forward the ``[2B, T]`` layout is rebuilt with
:func:`orpo_core.training.sharing.gather_pair_rows` and :attr:`PackedBatch.gather_index`, and the loss
of :mod:`orpo_core.training.loss` / :mod:`orpo_core.training.fused` runs unchanged on the original masks: every
gathered state saw the same tokens at the same positions as in the padded forward, so loss and
gradients are equal up to floating-point summation order (tests/test_packing.py, 1e-5
relative in float32).

How the model is told about the packing (:meth:`PackedBatch.model_kwargs`) depends on its
attention implementation (``config._attn_implementation``):

* ``flash_attention_2/3/4`` (plain only): ``position_ids`` plus ``cu_seq_lens_q/k`` and
  ``max_length_q/k``, exactly what transformers' ``DataCollatorWithFlattening(
  return_flash_attn_kwargs=True)`` produces; transformers' flash path then calls the varlen
  kernel (``modeling_flash_attention_utils._flash_attention_forward``; sliding windows are
  applied per sequence by the kernel).
* :data:`SEGMENT_SDPA` (what ``sdpa`` is switched to by :func:`enable_segment_sdpa`): the
  segments are passed to :func:`segment_sdpa_attention_forward`, which runs
  ``scaled_dot_product_attention`` once per segment (``is_causal=True`` for a plain row, a
  small ``[R, P + R]`` mask for a rejected run); on a CPU in bf16/fp16 each segment takes
  :mod:`orpo_core.training.cpu_attention` instead (grouped GEMMs with its own backward, faster
  than sdpa's CPU flash kernel on these short single-row segments). Neither CPU nor CUDA sdpa has a varlen entry;
  the one alternative, one ``[N, N]`` block-diagonal mask, computes every cross-sequence
  block: measured on 2 CPU threads (9 heads x 64, rows of 420/300/380/300 tokens, forward +
  backward of 30 layers) 3.9 s against 1.4 s per segment and 1.8 s padded.
* ``sdpa`` / ``eager`` otherwise: plain packing passes only restarted ``position_ids`` and no
  attention mask, and transformers' ``masking_utils`` detects the packing
  (``find_packed_sequence_indices``) and builds the block-diagonal (and sliding-window) mask
  itself; shared packing passes the dense ``[1, 1, N, N]`` mask of
  :meth:`PackedBatch.dense_mask` (correct, but quadratic in ``N``).

Sliding-window layers: the segment function only knows full causal attention, so a batch
with a row longer than the model's window uses transformers' own packed mask (plain) or is
refused (shared, as :mod:`orpo_core.training.sharing` does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from orpo_core.training.cpu_attention import (
    grouped_segment_attention,
    lower_right_causal,
    segment_attention_bias,
    use_cpu_segment_kernel,
)
from orpo_core.training.sharing import SUPPORTED_MODEL_TYPES, build_shared_batch

__all__ = [
    "SEGMENT_SDPA",
    "SEGMENTS_KWARG",
    "FLASH_ATTENTION",
    "AttentionSegment",
    "PackedBatch",
    "build_packed_batch",
    "padding_free_unsupported_reason",
    "segment_sdpa_attention_forward",
    "enable_segment_sdpa",
]

#: attention implementation name registered by :func:`enable_segment_sdpa` (sdpa + segments)
SEGMENT_SDPA = "orpo_segment_sdpa"
#: model keyword argument carrying the list of :class:`AttentionSegment` to the attention function
SEGMENTS_KWARG = "orpo_attention_segments"
#: attention implementations that take packed sequences natively (varlen kernels)
FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
#: implementations padding-free training supports
SUPPORTED_PACKED_ATTENTION = ("sdpa", SEGMENT_SDPA, "eager") + FLASH_ATTENTION


@dataclass
class AttentionSegment:
    """Queries ``[q_start, q_end)`` of the packed row attend to the keys ``k_ranges`` (in this
    order, concatenated), causally with lower-right alignment: query ``i`` (0-based within the
    segment) sees concatenated key ``j`` iff ``j <= i + (Lk - Lq)``.

    Attributes:
        q_start, q_end: query range (ints).
        k_ranges: tuple of ``(start, end)`` key ranges (ints).
        mask: ``[Lq, Lk]`` bool (True = attend) when ``Lk != Lq``, else None (``is_causal``).
    """

    q_start: int
    q_end: int
    k_ranges: tuple[tuple[int, int], ...]
    mask: torch.Tensor | None = None
    _bias: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def q_len(self) -> int:
        """``Lq``, the segment's queries."""
        return self.q_end - self.q_start

    @property
    def k_len(self) -> int:
        """``Lk``, the keys it sees (all ``k_ranges`` together)."""
        return sum(e - b for b, e in self.k_ranges)

    def bias(self, groups: int) -> torch.Tensor:
        """The additive ``[groups * Lq, Lk]`` float32 bias of
        :func:`orpo_core.training.cpu_attention.segment_attention_bias`, built once per segment
        (every layer of a forward passes the same segments)."""
        if groups not in self._bias:
            self._bias[groups] = segment_attention_bias(self.mask, self.q_len, self.k_len, groups)
        return self._bias[groups]


@dataclass
class PackedBatch:
    """A ``[2B, T]`` pair batch packed into one ``[1, N]`` row (see module docstring).

    Attributes:
        input_ids: ``[1, N]`` int64, the real tokens only.
        position_ids: ``[1, N]`` int64, restarting per row (plain) or per pair (shared).
        gather_index: ``[2B, T]`` int64, index into the ``N`` packed positions of each position
            of the padded layout (padding positions point at their row's first token; the loss
            masks never select them).
        segments: the :class:`AttentionSegment` list covering ``[0, N)`` in order.
        seq_lens: lengths of the packed sequences (plain: the ``2B`` rows; shared: the ``B``
            pair runs), Python ints.
        shared: whether prompts are shared.
        logical_length: longest unshared row ``max(P + max(C, R))``.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    gather_index: torch.Tensor
    segments: list[AttentionSegment]
    seq_lens: list[int]
    shared: bool
    logical_length: int
    _dense: dict = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        """``N``, the tokens the model computes."""
        return int(self.input_ids.shape[1])

    def dense_mask(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ``[1, 1, N, N]`` mask equivalent to :attr:`segments`: bool (True = attend) for
        ``dtype`` None / bool, else additive (0 / ``finfo(dtype).min``) as eager attention adds it."""
        key = dtype or torch.bool
        if key in self._dense:
            return self._dense[key]
        n = self.num_tokens
        device = self.input_ids.device
        allowed = torch.zeros(n, n, dtype=torch.bool, device=device)
        for s in self.segments:
            block = s.mask if s.mask is not None else lower_right_causal(s.q_len, s.k_len, device)
            col = 0
            for b, e in s.k_ranges:
                allowed[s.q_start : s.q_end, b:e] = block[:, col : col + e - b]
                col += e - b
        allowed = allowed[None, None]
        if key == torch.bool:
            out = allowed
        else:
            out = torch.zeros(allowed.shape, dtype=key, device=device)
            out.masked_fill_(~allowed, torch.finfo(key).min)
        self._dense[key] = out
        return out

    def model_kwargs(
        self, attn_implementation: str, sliding_window: int | None = None, mask_dtype: torch.dtype = torch.float32
    ) -> dict[str, Any]:
        """Keyword arguments for the model's forward (``input_ids``, ``position_ids`` and the
        packing information its attention implementation understands; see module docstring).
        ``mask_dtype``: dtype of the additive mask a shared batch passes to ``eager`` attention.

        Raises:
            NotImplementedError: ``attn_implementation`` cannot take this packing (a shared
                batch with flash attention, an unknown implementation), or a shared batch has a
                row longer than ``sliding_window``.
        """
        kw: dict[str, Any] = {"input_ids": self.input_ids, "position_ids": self.position_ids}
        too_long = sliding_window is not None and self.logical_length > sliding_window
        if self.shared and too_long:
            raise NotImplementedError(
                f"prompt sharing: a row of {self.logical_length} tokens exceeds the model's sliding window "
                f"({sliding_window}), which the shared attention pattern would bypass; set orpo.prompt_sharing: false"
            )
        if attn_implementation in FLASH_ATTENTION:
            if self.shared:
                raise NotImplementedError(
                    "prompt sharing needs a dense or segment attention mask; flash attention only takes packed "
                    "sequences. Set orpo.prompt_sharing: false or model.attn_implementation: sdpa"
                )
            device = self.input_ids.device
            cu = torch.tensor([0] + self.seq_lens, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)
            m = max(self.seq_lens)
            kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m, max_length_k=m)
        elif attn_implementation == SEGMENT_SDPA and not too_long:
            kw[SEGMENTS_KWARG] = self.segments
        elif attn_implementation in ("sdpa", "eager", SEGMENT_SDPA):
            if self.shared:
                kw["attention_mask"] = self.dense_mask(None if attn_implementation != "eager" else mask_dtype)
            # plain: no mask, transformers' masking_utils detects the packing from position_ids
        else:
            raise NotImplementedError(
                f"orpo.padding_free does not support attn_implementation {attn_implementation!r}; "
                f"supported: {', '.join(SUPPORTED_PACKED_ATTENTION)}. Set orpo.padding_free: false"
            )
        return kw


def _row_lengths(input_ids, attention_mask, completion_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated ``(lengths, prompt_lengths)`` of the ``[2B, T]`` rows (right padded, prompt then completion)."""
    if input_ids.dim() != 2 or input_ids.shape[0] % 2 or input_ids.shape[0] == 0:
        raise ValueError(
            f"padding-free packing needs a [2B, T] pair batch, got input_ids of shape {tuple(input_ids.shape)}"
        )
    if attention_mask.shape != input_ids.shape or completion_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} and "
            f"completion_mask {tuple(completion_mask.shape)} must have the same [2B, T] shape"
        )
    attn = attention_mask.bool()
    comp = completion_mask.bool()
    cols = torch.arange(input_ids.shape[1], device=input_ids.device)
    lens = attn.sum(1)
    starts = torch.where(comp.any(1), comp.int().argmax(1), lens)
    expected = cols[None] < lens[:, None]
    bad = (attn != expected).any(1) | (comp != (expected & (cols[None] >= starts[:, None]))).any(1) | (lens == 0)
    if bool(bad.any()):
        raise ValueError(f"padding-free packing: row {int(bad.nonzero()[0])} of the pair batch is not 'prompt then "
                         "completion, right padded' (a non-empty row, the completion up to the row end, padding only "
                         "at the end)")
    return lens, starts


def build_packed_batch(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor, *, share_prompts: bool = False
) -> PackedBatch:
    """Pack a ``[2B, T]`` pair batch into one ``[1, N]`` row without padding.

    Args:
        input_ids, attention_mask, completion_mask: the ``[2B, T]`` pair batch of
            :class:`orpo_core.training.collator.ORPODataCollator` (int ids, 0/1 masks; rows
            ``0..B-1`` prompt + chosen, ``B..2B-1`` prompt + rejected, right padded; each row's
            completion runs to its last real token).
        share_prompts: pack one ``[prompt | chosen | rejected]`` run per pair (prompt sharing)
            instead of the ``2B`` rows.

    Returns:
        :class:`PackedBatch` on the device of ``input_ids``.

    Raises:
        ValueError: the batch is not in the collator's layout (names the row), or, with
            ``share_prompts``, a pair's two rows differ in their prompt (names the pair).
    """
    device = input_ids.device
    n_rows, width = input_ids.shape
    if share_prompts:
        shared = build_shared_batch(input_ids, attention_mask, completion_mask, with_mask=False)
        half = n_rows // 2
        lens_t = attention_mask.bool().sum(1)
        comp = completion_mask.bool()
        starts = torch.where(comp.any(1), comp.int().argmax(1), lens_t)
        p, lc, lr = starts[:half], lens_t[:half], lens_t[half:]
        run = (lc + lr - p).tolist()
        length = shared.input_ids.shape[1]
        valid = torch.arange(length, device=device)[None] < (lc + lr - p)[:, None]
        ids = shared.input_ids[valid][None]
        pos = shared.position_ids[valid][None]
        offsets = torch.tensor([0] + run[:-1], device=device).cumsum(0)
        gi = shared.gather_index
        pair = gi // length
        gather = offsets[pair] + gi % length
        segments = []
        start = 0
        for pb, cb, rb in zip(p.tolist(), (lc - p).tolist(), (lr - p).tolist()):
            segments.append(AttentionSegment(start, start + pb + cb, ((start, start + pb + cb),)))
            q0 = start + pb + cb
            k_ranges = ((start, start + pb), (q0, q0 + rb))
            segments.append(AttentionSegment(q0, q0 + rb, k_ranges, lower_right_causal(rb, pb + rb, device)))
            start += pb + cb + rb
        return PackedBatch(ids.long(), pos.long(), gather.long(), segments, run, True, shared.logical_length)

    lens, _ = _row_lengths(input_ids, attention_mask, completion_mask)
    real = attention_mask.bool()
    ids = input_ids[real][None]
    cols = torch.arange(width, device=device)
    pos = cols[None].expand(n_rows, width)[real][None]
    seq = lens.tolist()
    offsets = torch.tensor([0] + seq[:-1], device=device).cumsum(0)
    gather = offsets[:, None] + torch.where(real, cols[None], torch.zeros_like(cols)[None])
    segments = []
    start = 0
    for n in seq:
        segments.append(AttentionSegment(start, start + n, ((start, start + n),)))
        start += n
    return PackedBatch(ids.long(), pos.long(), gather.long(), segments, seq, False, max(seq))


def padding_free_unsupported_reason(config) -> str | None:
    """Why padding-free training cannot run ``config``'s model, or None when it can.

    Needs a decoder that uses the given ``position_ids`` for its rotary embeddings and passes
    attention keyword arguments and a custom mask through to its attention function unchanged
    (:data:`orpo_core.training.sharing.SUPPORTED_MODEL_TYPES`, checked against transformers 5), and an
    attention implementation in ``SUPPORTED_PACKED_ATTENTION``."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return (
            f"model_type {model_type!r} is not a decoder tested with packed position_ids "
            f"(tested: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    attn = getattr(config, "_attn_implementation", None) or "eager"
    if attn not in SUPPORTED_PACKED_ATTENTION:
        return f"attn_implementation {attn!r} takes neither packed sequences nor a dense mask"
    return None


def segment_sdpa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: sdpa once per :class:`AttentionSegment` of a packed row.

    Without the :data:`SEGMENTS_KWARG` keyword (an ordinary padded batch, generation,
    evaluation) it is transformers' ``sdpa_attention_forward`` unchanged.

    Args:
        query: ``[1, Hq, N, D]``; key, value: ``[1, Hkv, N, D]`` (``Hq`` a multiple of ``Hkv``).
        attention_mask: ignored when segments are given (the segments define the pattern).

    Returns:
        ``([1, N, Hq, D] attention output, None)`` (transformers' convention).
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    segments = kwargs.pop(SEGMENTS_KWARG, None)
    if segments is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if query.shape[0] != 1:
        raise ValueError(f"segment attention needs one packed row, got a batch of {query.shape[0]}")
    dev = query.device.type
    if torch.is_autocast_enabled(dev):
        # cast once for the whole row: under autocast each sdpa call would otherwise cast its own
        # slices (the shared prompt keys once per segment that sees them), and every slice's
        # backward would zero-fill a full-row float32 gradient
        dt = torch.get_autocast_dtype(dev)
        query, key, value = query.to(dt), key.to(dt), value.to(dt)
    n_rep = query.shape[1] // key.shape[1]
    kernel = [use_cpu_segment_kernel(query, s.q_len, s.k_len, dropout) for s in segments]
    if n_rep > 1 and not all(kernel):
        key_rep, value_rep = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    else:
        key_rep, value_rep = key, value
    outs = []
    contiguous = all(a.q_end == b.q_start for a, b in zip(segments, segments[1:])) and segments[0].q_start == 0 \
        and segments[-1].q_end == query.shape[2]
    # the query ranges tile the row: one split (its backward is one cat) instead of a slice per
    # segment (each slice's backward zero-fills a full-row gradient)
    q_parts = query.split([s.q_end - s.q_start for s in segments], 2) if contiguous else None
    for i, s in enumerate(segments):
        q = q_parts[i] if q_parts is not None else query[:, :, s.q_start : s.q_end]
        kk, vv = (key, value) if kernel[i] else (key_rep, value_rep)
        if len(s.k_ranges) == 1:
            (b, e), = s.k_ranges
            k, v = kk[:, :, b:e], vv[:, :, b:e]
        else:
            k = torch.cat([kk[:, :, b:e] for b, e in s.k_ranges], 2)
            v = torch.cat([vv[:, :, b:e] for b, e in s.k_ranges], 2)
        if kernel[i]:
            # CPU bf16/fp16: grouped GEMMs + fp32 softmax with its own backward (cpu_attention.py)
            o = grouped_segment_attention(q, k, v, s.bias(n_rep), scaling)
        elif s.mask is None:
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=s.mask, dropout_p=dropout, scale=scaling)
        outs.append(o)
    out = torch.cat(outs, 2) if len(outs) > 1 else outs[0]
    return out.transpose(1, 2).contiguous(), None


def enable_segment_sdpa(model) -> bool:
    """Switch an ``sdpa`` model to :data:`SEGMENT_SDPA` (registering it with transformers'
    ``AttentionInterface`` / ``AttentionMaskInterface`` on first use).

    The new implementation behaves exactly like ``sdpa`` unless a forward passes
    :data:`SEGMENTS_KWARG`; ``_attn_implementation`` is not saved with the config, so a saved
    model still loads as ``sdpa``. Returns True when the model now uses it (False: the model
    was not on ``sdpa`` or does not allow setting its attention implementation)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    config = getattr(model, "config", None)
    attn = getattr(config, "_attn_implementation", None)
    if attn == SEGMENT_SDPA:
        return True
    if attn != "sdpa":
        return False
    if SEGMENT_SDPA not in AttentionInterface._global_mapping:
        AttentionInterface.register(SEGMENT_SDPA, segment_sdpa_attention_forward)
        ALL_MASK_ATTENTION_FUNCTIONS.register(SEGMENT_SDPA, sdpa_mask)
    try:
        model.set_attn_implementation(SEGMENT_SDPA)
    except (KeyError, ValueError) as err:  # pragma: no cover - transformers refused the name
        import logging

        logging.getLogger(__name__).warning("segment attention unavailable (%s); using sdpa with a dense mask", err)
        return False
    return getattr(model.config, "_attn_implementation", None) == SEGMENT_SDPA

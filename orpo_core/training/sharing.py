"""Prompt sharing: run a pair's prompt once for both completions (``orpo.prompt_sharing``).

The plain ORPO batch (:mod:`orpo_core.training.collator`) is ``[2B, T]``: rows ``prompt + chosen``
then ``prompt + rejected``, so every prompt token goes through the model twice. With
prompt sharing each pair becomes ONE row ``[prompt | chosen | rejected]`` of length
``P + C + R`` (right padded to the batch's longest, ``L``):

* **attention** (``[B, 1, L, L]``): causal, except that rejected positions do not see
  chosen positions, and padding keys are masked. A rejected token therefore attends to
  exactly the tokens it attends to in its own ``prompt + rejected`` row.
* **positions**: prompt ``0..P-1``, chosen ``P..P+C-1``, rejected ``P..P+R-1`` (restart
  after the prompt), so rotary embeddings see the same positions as in the unshared row.

After the forward the usual ``[2B, T]`` layout is rebuilt by gathering rows of the last
hidden states (or logits): chosen row ``b`` = ``h[b, 0:P+C]``, rejected row ``b`` =
``h[b, 0:P]`` followed by ``h[b, P+C:P+C+R]`` (the last prompt position predicts the
first token of both completions). Every gathered state equals the unshared model's state
at that position (same tokens visible, same positions), so the ORPO loss of
:mod:`orpo_core.training.loss` / :mod:`orpo_core.training.fused` is computed unchanged on the gathered
tensors, with the original ``[2B, T]`` ``input_ids`` / ``attention_mask`` /
``completion_mask``, and loss and gradients equal the unshared computation (up to
floating-point summation order). Prompt tokens are computed once instead of twice.

This is the "shared prefix" trick of packed preference training (e.g. the prefix-sharing
idea of Wang et al. 2024, "Accelerating Direct Preference Optimization with Prefix
Sharing", arXiv 2410.20305), written for the ORPO pair layout.

Model support: the custom mask is passed as a 4D ``attention_mask``; transformers 5
(``masking_utils._preprocess_mask_arguments``) returns a 4D mask as-is. The ``sdpa``
attention takes a boolean mask (True = attend), ``eager`` adds the mask to the scores
(additive float: 0 = attend, ``finfo(dtype).min`` = masked); other attention kernels
(flash-attention, flex) do not take a dense 4D mask. Only the decoder families tested
with this code (:data:`SUPPORTED_MODEL_TYPES`) are allowed. Layers with a sliding window
would ignore their window under a custom 4D mask, so a batch whose unshared rows are
longer than the window raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "SUPPORTED_ATTENTION",
    "SharedPairBatch",
    "check_prompt_sharing_support",
    "sliding_window_of",
    "build_shared_batch",
    "gather_pair_rows",
    "shared_pair_length",
    "shared_pair_lengths",
    "prompt_sharing_unsupported_reason",
    "sharing_pays",
    "layout_cost",
]

#: ``config.model_type`` values whose forward passes a 4D mask and ``position_ids`` through
#: unchanged (transformers 5 Llama-style decoders)
SUPPORTED_MODEL_TYPES = ("llama", "smollm3", "mistral", "qwen2", "qwen3")
#: ``config._attn_implementation`` values that take a dense 4D mask (``orpo_segment_sdpa`` is
#: :data:`orpo_core.training.packing.SEGMENT_SDPA`: sdpa plus per-segment packed attention)
SUPPORTED_ATTENTION = ("sdpa", "eager", "orpo_segment_sdpa")


def shared_pair_length(row: dict[str, Any]) -> int:
    """Length in tokens of a pair's shared row: ``len(prompt) + len(chosen) + len(rejected)``."""
    return len(row["prompt_input_ids"]) + len(row["chosen_input_ids"]) + len(row["rejected_input_ids"])


def shared_pair_lengths(dataset) -> list[int]:
    """:func:`shared_pair_length` of every row of a ``datasets.Dataset`` (or a list of row dicts)
    (the lengths length-grouped batching uses when prompt sharing is on)."""
    if hasattr(dataset, "column_names"):
        prompts = dataset["prompt_input_ids"]
        chosen = dataset["chosen_input_ids"]
        rejected = dataset["rejected_input_ids"]
        return [len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected)]
    return [shared_pair_length(row) for row in dataset]


def sliding_window_of(config) -> int | None:
    """The sliding-window size some attention layer of ``config`` uses, or None.

    Sliding attention is in effect when ``config.layer_types`` names a
    ``"sliding_attention"`` layer (SmolLM3, Qwen2/3 with ``use_sliding_window``), or for
    Mistral whenever ``config.sliding_window`` is set (its mask is built with
    ``create_sliding_window_causal_mask`` then)."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None) or ()
    if "sliding_attention" in layer_types:
        return int(window)
    if getattr(config, "model_type", None) == "mistral":
        return int(window)
    return None


def prompt_sharing_unsupported_reason(config) -> str | None:
    """Why prompt sharing cannot run ``config``'s model (the message
    :func:`check_prompt_sharing_support` raises), or None when it can."""
    try:
        check_prompt_sharing_support(config)
    except NotImplementedError as err:
        return str(err)
    return None


def check_prompt_sharing_support(config) -> None:
    """Raise unless prompt sharing is known to give the unshared result for this model.

    Args:
        config: the (base, not peft-wrapped) model's ``PretrainedConfig``.

    Raises:
        NotImplementedError: ``config.model_type`` is not in :data:`SUPPORTED_MODEL_TYPES`,
            or ``config._attn_implementation`` is not in :data:`SUPPORTED_ATTENTION`
            (names the value found and what to set instead).
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"orpo.prompt_sharing is not supported for model_type {model_type!r}: it needs a decoder that "
            f"passes a custom 4D attention mask and position_ids through unchanged; tested: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}. Set orpo.prompt_sharing: false"
        )
    attn = getattr(config, "_attn_implementation", None) or "eager"
    if attn not in SUPPORTED_ATTENTION:
        raise NotImplementedError(
            f"orpo.prompt_sharing needs attn_implementation 'sdpa' or 'eager' (a dense 4D mask), the model "
            f"uses {attn!r}. Set model.attn_implementation: sdpa or orpo.prompt_sharing: false"
        )


@dataclass
class SharedPairBatch:
    """The shared layout of a ``[2B, T]`` pair batch (see module docstring).

    Attributes:
        input_ids: ``[B, L]`` int64, ``prompt | chosen | rejected``, right padded.
        position_ids: ``[B, L]`` int64, prompt ``0..P-1``, chosen ``P..P+C-1``, rejected
            ``P..P+R-1`` (padding continues the rejected count; it is never attended to).
        attention_mask: ``[B, 1, L, L]``; bool (True = attend) or, when built with a float
            ``mask_dtype``, additive (0 = attend, ``finfo.min`` = masked); None when built
            ``with_mask=False``.
        gather_index: ``[2B, T]`` int64, flat index into the ``B * L`` shared positions of
            each position of the ``[2B, T]`` layout (padding positions point at position 0
            of their pair; the loss masks never select them).
        logical_length: longest unshared row, ``max(P + max(C, R))`` (int).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    gather_index: torch.Tensor
    logical_length: int


def build_shared_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    mask_dtype: torch.dtype | None = None,
    pad_token_id: int = 0,
    with_mask: bool = True,
) -> SharedPairBatch:
    """Build the shared ``[B, L]`` layout from a ``[2B, T]`` pair batch.

    Args:
        input_ids, attention_mask, completion_mask: the ``[2B, T]`` pair batch, laid out as
            :func:`orpo_core.training.packing.build_packed_batch` takes it (the completion
            contiguous, right after the prompt).
        mask_dtype: None or ``torch.bool``: boolean 4D mask (``sdpa``); a float dtype: additive
            mask in that dtype (``eager``).
        pad_token_id: id written into the shared padding positions (masked as keys).
        with_mask: False skips the ``[B, 1, L, L]`` mask (``attention_mask`` is then None; the
            padding-free path of :mod:`orpo_core.training.packing` describes attention by segments).

    Returns:
        :class:`SharedPairBatch` on the device of ``input_ids``.

    Raises:
        ValueError: the batch is not in the collator's layout (odd row count, left padding,
            a completion not contiguous to the row end, empty prompt/completion), or the two
            rows of pair ``b`` differ in prompt length or prompt tokens; names the pair.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] % 2 or input_ids.shape[0] == 0:
        raise ValueError(f"prompt sharing needs a [2B, T] pair batch, got input_ids of shape {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape or completion_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} and "
            f"completion_mask {tuple(completion_mask.shape)} must have the same [2B, T] shape"
        )
    device = input_ids.device
    n_rows, width = input_ids.shape
    half = n_rows // 2
    attn = attention_mask.bool()
    comp = completion_mask.bool()
    cols = torch.arange(width, device=device)
    lens = attn.sum(1)
    starts = torch.where(comp.any(1), comp.int().argmax(1), lens)  # prompt length of each row
    expected_attn = cols[None] < lens[:, None]
    expected_comp = expected_attn & (cols[None] >= starts[:, None])
    bad = (attn != expected_attn).any(1) | (comp != expected_comp).any(1) | (starts == 0) | (starts == lens)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise ValueError(
            f"prompt sharing: row {row} of the pair batch is not 'prompt then completion, right padded' "
            "(non-empty prompt, a non-empty completion up to the row end, padding only at the end)"
        )
    p = starts[:half]
    if bool((p != starts[half:]).any()):
        b = int((p != starts[half:]).nonzero()[0])
        raise ValueError(
            f"prompt sharing: pair {b} has prompt length {int(p[b])} in its chosen row and "
            f"{int(starts[half + b])} in its rejected row"
        )
    same = (input_ids[:half] == input_ids[half:]) | (cols[None] >= p[:, None])
    if not bool(same.all()):
        b = int((~same).any(1).nonzero()[0])
        raise ValueError(f"prompt sharing: pair {b} has different prompt tokens in its chosen and rejected rows")

    lc = lens[:half]  # P + C
    lr = lens[half:]  # P + R
    ls = lc + lr - p  # P + C + R
    length = int(ls.max())
    j = torch.arange(length, device=device)[None]  # [1, L]
    in_chosen = j < lc[:, None]  # prompt or chosen
    valid = j < ls[:, None]
    rej_pos = j - lc[:, None] + p[:, None]  # position (= column in the rejected row) of shared index j
    batch_idx = torch.arange(half, device=device)[:, None]
    src_row = torch.where(in_chosen, batch_idx, batch_idx + half)
    src_col = torch.where(in_chosen, j, rej_pos).clamp(0, width - 1)
    shared_ids = input_ids[src_row, src_col]
    shared_ids = torch.where(valid, shared_ids, torch.full_like(shared_ids, int(pad_token_id)))
    position_ids = torch.where(in_chosen, j, rej_pos).long()

    # segment: 1 chosen, 2 rejected (prompt and padding 0); padding keys are masked by `valid`
    seg = torch.zeros_like(shared_ids, dtype=torch.int8)
    seg = torch.where(in_chosen & (j >= p[:, None]), torch.ones_like(seg), seg)
    seg = torch.where(~in_chosen & valid, torch.full_like(seg, 2), seg)
    if not with_mask:
        mask = None
    else:
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        allowed = causal[None] & valid[:, None, :]  # [B, Lq, Lk]
        allowed = allowed & ~((seg[:, :, None] == 2) & (seg[:, None, :] == 1))
        allowed = allowed[:, None]  # [B, 1, L, L]
        if mask_dtype is None or mask_dtype == torch.bool:
            mask = allowed
        else:
            mask = torch.zeros(allowed.shape, dtype=mask_dtype, device=device)
            mask.masked_fill_(~allowed, torch.finfo(mask_dtype).min)

    # [2B, T] gather index into the flattened [B * L] shared positions
    t = cols[None]  # [1, T]
    chosen_src = torch.where(t < lc[:, None], t, torch.zeros_like(t))
    rej_src = torch.where(t < p[:, None], t, t - p[:, None] + lc[:, None])
    rej_src = torch.where(t < lr[:, None], rej_src, torch.zeros_like(rej_src))
    offsets = (torch.arange(half, device=device) * length)[:, None]
    gather_index = torch.cat([chosen_src + offsets, rej_src + offsets], 0).long()
    logical = int(torch.maximum(lc, lr).max())
    return SharedPairBatch(shared_ids.long(), position_ids, mask, gather_index, logical)


def gather_pair_rows(x: torch.Tensor, gather_index: torch.Tensor) -> torch.Tensor:
    """Rebuild ``[2B, T, ...]`` rows from shared ``[B, L, ...]`` states (hidden states or logits).

    ``out[r, t] = x.flatten(0, 1)[gather_index[r, t]]``; differentiable (index_select), so the
    gradient of a prompt position is the sum of its chosen- and rejected-row gradients."""
    flat = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    out = flat.index_select(0, gather_index.reshape(-1).to(x.device))
    return out.reshape(*gather_index.shape, *x.shape[2:])



def _per_layer_costs(config) -> tuple[float, float]:
    """``(linear, attention)`` forward FLOPs of one decoder layer: per token, and per attended
    (query, key) pair. Linear: ``2 x`` the q/k/v/o and gated-MLP weights; attention:
    ``QK^T`` and ``AV``, ``2 * 2 * heads * head_dim``."""
    h = int(getattr(config, "hidden_size", 0) or 0)
    if h <= 0:
        return 1.0, 0.0
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    head_dim = int(getattr(config, "head_dim", 0) or h // heads)
    kv = int(getattr(config, "num_key_value_heads", heads) or heads)
    inter = int(getattr(config, "intermediate_size", 4 * h) or 4 * h)
    linear = 2.0 * (2 * h * heads * head_dim + 2 * h * kv * head_dim + 3 * h * inter)
    return linear, 4.0 * heads * head_dim


def layout_cost(prompt_lens, chosen_lens, rejected_lens, *, shared: bool, padding_free: bool, config,
                segment_attention: bool = True) -> float:
    """Estimated forward FLOPs per decoder layer of one pair batch in a given layout.

    Args:
        prompt_lens, chosen_lens, rejected_lens: per-pair token counts ``P``, ``C``, ``R``.
        shared: one ``[prompt | chosen | rejected]`` row per pair instead of two rows.
        padding_free: packed without padding (:mod:`orpo_core.training.packing`) instead of padded.
        config: the model config (hidden size, heads, KV heads, head dim, intermediate size).
        segment_attention: packed attention runs per segment (causal rows cost ``l^2 / 2``
            pairs, a rejected run ``R * (P + R)``); False: one dense ``[N, N]`` mask (``N^2``).

    Tokens computed: padded ``rows x width`` (``2B x max(P + max(C, R))`` or
    ``B x max(P + C + R)``), packed the real tokens. Attended pairs: a padded row with a mask
    computes its full ``width^2`` square (sdpa takes no ``is_causal`` shortcut with a mask)."""
    lin, att = _per_layer_costs(config)
    rows = list(zip(prompt_lens, chosen_lens, rejected_lens))
    if not padding_free:
        if shared:
            width = max(p + c + r for p, c, r in rows)
            n_rows = len(rows)
        else:
            width = max(p + max(c, r) for p, c, r in rows)
            n_rows = 2 * len(rows)
        return n_rows * width * lin + n_rows * width * width * att
    if shared:
        tokens = sum(p + c + r for p, c, r in rows)
        pairs = sum((p + c) ** 2 / 2 + r * (p + r) for p, c, r in rows)
    else:
        tokens = sum(2 * p + c + r for p, c, r in rows)
        pairs = sum(((p + c) ** 2 + (p + r) ** 2) / 2 for p, c, r in rows)
    if not segment_attention:
        pairs = tokens * tokens
    return tokens * lin + pairs * att


def sharing_pays(prompt_lens, chosen_lens, rejected_lens, *, padding_free: bool, config,
                 segment_attention: bool = True, margin: float | None = None) -> bool:
    """The ``orpo.prompt_sharing: auto`` rule: share this batch's prompts when the estimated
    cost of the shared layout (:func:`layout_cost`) is below ``(1 - margin)`` times the
    unshared one's; ``margin`` defaults to 0.05 packed (padding-free) and 0.25 padded.

    The margin covers what the FLOP count leaves out (building the 4D mask or the segments,
    gathering the rows back, masked sdpa calls instead of ``is_causal`` ones). Source
    measurement: ``benchmarks/bench_packing.py`` on SmolLM2-135M-Instruct, UltraFeedback,
    max_length 512, 2 pairs per batch, 2 CPU threads under load (docs/training.md, Performance):
    per CPU-second, padding-free + sharing gave 1.44-1.65x the padded batch's useful tokens
    and padding-free alone 1.27-1.34x, so packed sharing pays as soon as the prompt is a few
    percent of the pair; padded sharing ([B, L] rows with a dense 4D mask) gave 0.87-1.0x on
    batches the estimate put at 1.055 and 0.579 of the unshared cost, hence the wider margin."""
    if margin is None:
        margin = 0.05 if padding_free else 0.25
    kw = dict(padding_free=padding_free, config=config, segment_attention=segment_attention)
    shared = layout_cost(prompt_lens, chosen_lens, rejected_lens, shared=True, **kw)
    plain = layout_cost(prompt_lens, chosen_lens, rejected_lens, shared=False, **kw)
    return shared <= (1.0 - margin) * plain

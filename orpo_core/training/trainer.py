"""ORPO trainer on top of ``transformers.Trainer``.

What it adds to ``Trainer`` (reference behaviour: TRL ``ORPOTrainer``,
trl/experimental/orpo/orpo_trainer.py):

* **One concatenated forward** per pair batch (``[2B, T]``, chosen rows first; see
  :mod:`orpo_core.training.collator`), loss = ``alpha * NLL + beta * mean(-logsigmoid(log_odds))``
  (Hong et al. 2024, eq. 6-7) from :func:`orpo_core.training.fused.orpo_loss_from_hidden` when
  ``orpo.fused_loss`` (the model is called with ``output_hidden_states=True`` and
  ``logits_to_keep=1`` so the ``[2B, T, V]`` logits are never built; the lm-head
  weight is taken from ``get_output_embeddings()``, which also covers tied embeddings
  and peft's ``modules_to_save`` copy) or :func:`orpo_core.training.loss.orpo_loss_from_logits`.
  On the first fused batch the trainer checks that ``lm_head(hidden[:, -1])`` equals the
  model's own last-position logits, so a model whose last hidden state is not the
  lm-head input fails loudly instead of training on wrong logits.
* **Mixed precision** (``args.bf16`` / ``args.fp16``, see :mod:`orpo_core.models.precision`): the
  model's forward runs under Trainer's (accelerate's) autocast over float32 master weights;
  the fused loss, which runs after the forward, does its lm-head matmuls in the autocast dtype
  (``matmul_dtype``) and keeps log-softmax, log-probs, ``log1mexp``, the odds ratio and its
  accumulators in float32.
* **Exact gradient accumulation**: :meth:`get_batch_samples` counts the chosen-row NLL
  tokens and the pairs of the whole accumulation window (summed over processes) and
  the loss of each micro-batch is ``sum / window_total`` (``nll_denominator`` /
  ``pair_denominator``), so micro-batch gradients add up to the full-batch gradient.
  ``loss_is_scaled_for_ga = True`` stops Trainer from dividing again by the number of
  accumulation steps; under DDP (which averages gradients) the loss is multiplied by
  the number of processes, as Trainer does for ``num_items_in_batch``.
* **TRL metric names** (``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
  ``rewards/margins``, ``logps/*``, ``logits/*``, ``nll_loss``, ``log_odds_ratio``,
  ``log_odds_chosen``; ``eval_``-prefixed in evaluation) accumulated per micro-batch and
  logged as means (over micro-batches and processes) at each logging step, as TRL's
  ``store_metrics``; plus ``aux_loss`` for MoE models and ``skipped_nonfinite``.
* **Coefficient schedules** for ``beta`` and ``alpha`` (constant, or linear from
  ``start`` over ``warmup_steps`` optimizer steps).
* **Non-finite losses/gradients**: ``orpo.on_nonfinite: raise`` stops with an error
  naming the global step and the batch (row indices and sources); ``skip`` drops the
  micro-batch (zero gradient contribution; the window's denominators still count it)
  or, for a non-finite gradient, the whole optimizer step, and counts it in
  ``skipped_nonfinite``.
* **MoE router auxiliary loss** (``output_router_logits=True`` when the model config
  has it; weight ``orpo.router_aux_loss_coef`` or the config's ``router_aux_loss_coef``).
* **Length-grouped, seeded sampling** (:class:`orpo_core.training.collator.LengthGroupedPairSampler`;
  by shared-row length ``P + C + R`` when prompt sharing is on).
* **Prompt sharing** (``orpo.prompt_sharing``; :mod:`orpo_core.training.sharing`): each pair runs
  as one row ``[prompt | chosen | rejected]`` with a 4D mask (rejected tokens do not see
  chosen ones) and restarted position ids; the last hidden states (or logits) are gathered
  back into the ``[2B, T]`` layout and the loss is computed unchanged, so loss, gradients,
  accumulation denominators and metrics are those of the unshared forward while each prompt
  is computed once. ``auto`` (the default) decides per batch with
  :func:`orpo_core.training.sharing.sharing_pays` when the model supports it.
* **Padding-free batches** (``orpo.padding_free``; :mod:`orpo_core.training.packing`): the batch's
  rows (or shared pair runs) are packed into one ``[1, N]`` row of real tokens with
  restarted positions and attention confined to each sequence (flash-attention varlen, or
  per-segment sdpa: an ``sdpa`` model is switched to
  :data:`orpo_core.training.packing.SEGMENT_SDPA`), then gathered back to ``[2B, T]`` for the same
  loss. ``auto`` (the default) packs for supported decoders with sdpa or flash attention.
"""

from __future__ import annotations

import inspect
import logging
import math
import sys
from collections import defaultdict
from typing import Any

import torch
from transformers import Trainer

from orpo_core.training.collator import LengthGroupedPairSampler, pair_lengths
from orpo_core.config import ORPOConfig, ScheduleConfig
from orpo_core.training.fused import lm_head_transform_from_config, orpo_loss_from_hidden
from orpo_core.training.loss import ORPOLossOutput, nll_token_count, orpo_loss_from_logits
from orpo_core.training.packing import (
    FLASH_ATTENTION,
    SEGMENT_SDPA,
    build_packed_batch,
    enable_segment_sdpa,
    padding_free_unsupported_reason,
)
from orpo_core.training.sharing import (
    build_shared_batch,
    check_prompt_sharing_support,
    gather_pair_rows,
    prompt_sharing_unsupported_reason,
    shared_pair_lengths,
    sharing_pays,
    sliding_window_of,
)

logger = logging.getLogger(__name__)

__all__ = ["ORPOTrainer", "NonFiniteLossError", "schedule_value", "METRIC_NAMES"]

#: per-micro-batch metrics logged (TRL names; ``eval_`` prefix in evaluation)
METRIC_NAMES = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "nll_loss",
    "log_odds_ratio",
    "log_odds_chosen",
    "aux_loss",
)


class NonFiniteLossError(FloatingPointError):
    """A training loss or gradient norm was NaN/inf (``orpo.on_nonfinite: raise``).

    The message names the global step and the batch's rows and sources."""


def schedule_value(target: float, schedule: ScheduleConfig, step: int) -> float:
    """Coefficient at optimizer step ``step`` (0-based: the step being computed).

    ``constant``: ``target``. ``linear``: ``start + (target - start) * min(1, step / warmup_steps)``
    (``target`` from ``warmup_steps`` on; ``warmup_steps = 0`` gives ``target``)."""
    if schedule.type == "constant" or schedule.warmup_steps == 0:
        return float(target)
    frac = min(1.0, max(0, step) / schedule.warmup_steps)
    return float(schedule.start + (target - schedule.start) * frac)


def _unwrap_peft(model):
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _describe_batch(inputs: dict[str, Any]) -> str:
    parts = []
    rows = inputs.get("row_index")
    if rows is not None:
        rows = rows.tolist() if torch.is_tensor(rows) else list(rows)
        parts.append(f"rows {rows}")
    sources = inputs.get("source")
    if sources is not None:
        uniq = sorted(set(sources))
        parts.append(f"sources {uniq}")
    ids = inputs.get("input_ids")
    if ids is not None:
        parts.append(f"shape {list(ids.shape)}")
    return ", ".join(parts) if parts else "unknown rows"


class ORPOTrainer(Trainer):
    """``transformers.Trainer`` for ORPO on pair batches from :class:`orpo_core.training.collator.ORPODataCollator`.

    Args:
        model: causal LM or ``peft.PeftModel`` (see :func:`orpo_core.models.loading.load_model`).
        args: ``TrainingArguments``; ``remove_unused_columns`` must be False (the collator
            needs the token columns, which the model's forward does not take).
        orpo: the recipe's :class:`orpo_core.config.ORPOConfig`.
        group_by_length: use :class:`LengthGroupedPairSampler` (seeded with
            ``args.data_seed`` or ``args.seed``) for training.
        **kwargs: passed to ``Trainer`` (``train_dataset``, ``eval_dataset``,
            ``data_collator``, ``processing_class``, ``callbacks``).

    Raises:
        ValueError: ``remove_unused_columns`` is True, or both coefficient schedules start
            at 0 (the first steps would have nothing to train).
        NotImplementedError: ``orpo.prompt_sharing: true`` for a model type or attention
            implementation that does not take a custom 4D mask (see
            :func:`orpo_core.training.sharing.check_prompt_sharing_support`), or
            ``orpo.padding_free: true`` for one that cannot take packed sequences (see
            :func:`orpo_core.training.packing.padding_free_unsupported_reason`). With ``auto`` these
            fall back to the unshared / padded batch, logging the reason.

    Attributes:
        prompt_sharing: True, False or ``"auto"`` (decided per batch).
        padding_free: whether batches are packed (resolved at construction).
    """

    # compute_loss returns the window-normalised loss (see module docstring)
    loss_is_scaled_for_ga = True

    def __init__(self, model, args, orpo: ORPOConfig, group_by_length: bool = False, **kwargs):
        if args.remove_unused_columns:
            raise ValueError(
                "ORPOTrainer needs TrainingArguments(remove_unused_columns=False): the collator reads "
                "prompt_input_ids/chosen_input_ids/rejected_input_ids, which the model does not take"
            )
        b0 = schedule_value(orpo.beta, orpo.beta_schedule, 0)
        a0 = schedule_value(orpo.alpha, orpo.alpha_schedule, 0)
        if b0 == 0 and a0 == 0:
            raise ValueError("orpo.beta_schedule and orpo.alpha_schedule both start at 0: step 0 would train nothing")
        base_config = getattr(_unwrap_peft(model), "config", None)
        self.prompt_sharing = orpo.prompt_sharing
        if self.prompt_sharing is True:
            check_prompt_sharing_support(base_config)
        elif self.prompt_sharing == "auto":
            reason = prompt_sharing_unsupported_reason(base_config)
            if reason:
                logger.info("orpo.prompt_sharing: auto -> off: %s", reason)
                self.prompt_sharing = False
        self.padding_free = self._resolve_padding_free(orpo.padding_free, _unwrap_peft(model), base_config)
        self.orpo = orpo
        self.group_by_length = group_by_length
        super().__init__(model=model, args=args, **kwargs)

        base = _unwrap_peft(self.model)
        config = getattr(base, "config", None)
        self._logit_scale, self._softcap = (None, None)
        self.use_fused = bool(orpo.fused_loss)
        if self.use_fused:
            reason = self._fused_unsupported_reason(base)
            if reason:
                logger.warning("orpo.fused_loss disabled: %s; using the unfused loss", reason)
                self.use_fused = False
        if self.use_fused and config is not None:
            self._logit_scale, self._softcap = lm_head_transform_from_config(config)
        try:
            params = inspect.signature(base.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover
            params = {}
        self._accepts_logits_to_keep = "logits_to_keep" in params
        self._fused_checked = False
        self.aux_enabled = config is not None and hasattr(config, "output_router_logits")
        coef = orpo.router_aux_loss_coef
        if coef is None:
            coef = getattr(config, "router_aux_loss_coef", None) if config is not None else None
        self.aux_coef = float(coef) if coef is not None else 0.001
        self._stored: dict[str, dict[str, list[torch.Tensor]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.skipped_nonfinite = 0
        self._micro_step = 0

    # ------------------------------------------------------------------ setup helpers
    @staticmethod
    def _resolve_padding_free(setting, base, config) -> bool:
        """``orpo.padding_free`` -> bool; an ``sdpa`` model that packs is switched to segment sdpa."""
        if setting is False:
            return False
        reason = padding_free_unsupported_reason(config) if config is not None else "the model has no config"
        attn = getattr(config, "_attn_implementation", None) or "eager"
        if reason is None and setting == "auto" and attn == "eager":
            reason = "eager attention would need a dense [N, N] mask over the packed row (use sdpa)"
        if reason:
            if setting is True:
                raise NotImplementedError(f"orpo.padding_free: {reason}. Set orpo.padding_free: false")
            logger.info("orpo.padding_free: auto -> off: %s", reason)
            return False
        if attn == "sdpa" and not enable_segment_sdpa(base):
            logger.warning("orpo.padding_free: segment attention unavailable, packed rows use a dense mask")
        return True

    @staticmethod
    def _fused_unsupported_reason(base) -> str | None:
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        if head is None:
            return "the model has no output embedding (lm-head) module"
        try:
            from peft.tuners.lora import LoraLayer
        except ImportError:  # pragma: no cover
            LoraLayer = ()
        if isinstance(head, LoraLayer):
            return "the lm-head carries a LoRA adapter (its effective weight is not a single tensor)"
        if getattr(head, "weight", None) is None:
            return "the lm-head has no weight tensor"
        return None

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.group_by_length or dataset is None:
            return super()._get_train_sampler(train_dataset)
        if self.prompt_sharing is True:
            lengths = shared_pair_lengths(dataset)  # one [prompt | chosen | rejected] row per pair
        elif "length" in getattr(dataset, "column_names", []):
            lengths = list(dataset["length"])
        else:
            lengths = pair_lengths(dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * max(1, self.args.world_size)
        return LengthGroupedPairSampler(lengths, batch, seed=seed)

    # ------------------------------------------------------------------ resuming a finished run
    def _init_training_state(self, *args, **kwargs):
        """``Trainer._init_training_state`` that trains no further when the checkpoint resumed
        is already at ``max_steps``.

        transformers 5 checks ``global_step >= max_steps`` only after an optimizer step, so a
        run resumed from its final checkpoint (a retried task whose process died after saving
        it, before the model was written) trains one extra step. Returning an epoch past the
        last makes the epoch loop empty; the checkpoint's weights, optimizer and state are
        still loaded, and the run ends at the checkpoint's ``global_step``."""
        epochs_trained, steps_in_epoch = super()._init_training_state(*args, **kwargs)
        if 0 < self.state.max_steps <= self.state.global_step:
            logger.info("the checkpoint resumed is at step %d of %d: nothing left to train",
                        self.state.global_step, self.state.max_steps)
            return sys.maxsize, 0
        return epochs_trained, steps_in_epoch

    # ------------------------------------------------------------------ coefficients
    def current_coefficients(self) -> tuple[float, float]:
        """``(beta, alpha)`` for the optimizer step being computed (see :func:`schedule_value`)."""
        step = self.state.global_step if getattr(self, "state", None) is not None else 0
        o = self.orpo
        return schedule_value(o.beta, o.beta_schedule, step), schedule_value(o.alpha, o.alpha_schedule, step)

    # ------------------------------------------------------------------ accumulation window
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch the window's micro-batches and count its NLL tokens and pairs.

        Returns ``(batches, {"nll_tokens": float, "pairs": float})`` where the counts are
        summed over the window's micro-batches and over all processes; they become the
        ``nll_denominator`` / ``pair_denominator`` of every micro-batch's loss."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        nll = 0
        pairs = 0
        for b in batches:
            nll += nll_token_count(b["attention_mask"], b["completion_mask"], self.orpo.nll_on_prompt)
            pairs += b["input_ids"].shape[0] // 2
        counts = torch.tensor([nll, pairs], dtype=torch.long, device=device)
        if self.args.world_size > 1:
            counts = self.accelerator.gather(counts.unsqueeze(0)).view(-1, 2).sum(0)
        nll_total, pair_total = (float(x) for x in counts.tolist())
        return batches, {"nll_tokens": max(nll_total, 1.0), "pairs": max(pair_total, 1.0)}

    # ------------------------------------------------------------------ forward + loss
    def _lm_head(self, model):
        base = _unwrap_peft(self.accelerator.unwrap_model(model))
        head = base.get_output_embeddings()
        return head.weight, getattr(head, "bias", None)

    def _matmul_dtype(self, weight) -> torch.dtype | None:
        """dtype of the fused loss's lm-head matmuls: the autocast dtype under bf16/fp16 mixed
        precision (``args.bf16`` / ``args.fp16``) when the weight is float32 (the master copy),
        else None (the weight's own dtype). Log-softmax and the ORPO terms stay float32."""
        if weight.dtype != torch.float32:
            return None
        if self.args.bf16:
            return torch.bfloat16
        if self.args.fp16:
            return torch.float16
        return None

    def _check_fused(self, outputs, hidden, weight, bias) -> None:
        """Compare the model's logits with ``lm_head(hidden)`` on the last position (once)."""
        with torch.no_grad():
            ref = outputs.logits[:, -1].float()
            z = hidden[:, -1].to(weight.dtype) @ weight.t()
            if bias is not None:
                z = z + bias
            z = z.float()
            if self._logit_scale is not None:
                z = z * self._logit_scale
            if self._softcap is not None:
                z = self._softcap * torch.tanh(z / self._softcap)
            # under autocast the model's own logits come from a bf16/fp16 matmul
            tol = 1e-3 if weight.dtype == torch.float32 and self._matmul_dtype(weight) is None else 3e-2
            scale = ref.abs().max().clamp(min=1.0)
            err = (ref - z).abs().max()
        if not bool(err <= tol * scale):
            raise RuntimeError(
                f"fused ORPO loss: the model's last hidden state does not reproduce its logits "
                f"(max |difference| {float(err):.3g}); this architecture transforms the lm-head input or output "
                "in a way the fused loss does not know. Set orpo.fused_loss: false."
            )
        self._fused_checked = True

    def orpo_forward(
        self,
        model,
        inputs: dict[str, Any],
        *,
        beta: float,
        alpha: float,
        nll_denominator: float | None = None,
        pair_denominator: float | None = None,
    ) -> tuple[ORPOLossOutput, torch.Tensor | None]:
        """One concatenated forward of the ``[2B, T]`` pair batch and the ORPO loss.

        Returns ``(ORPOLossOutput, aux_loss or None)``; ``aux_loss`` is the MoE router
        load-balancing loss returned by the model (unweighted), when enabled.

        With prompt sharing (:meth:`share_batch`) and/or padding-free packing the model runs
        on the shared ``[B, L]`` layout of :func:`orpo_core.training.sharing.build_shared_batch` or the
        packed ``[1, N]`` row of :func:`orpo_core.training.packing.build_packed_batch`, and its last
        hidden states (fused) or logits (unfused) are gathered back to ``[2B, T]`` before the
        same loss call."""
        kwargs, gather_index = self._model_inputs(model, inputs)
        kwargs["use_cache"] = False
        if self.aux_enabled:
            kwargs["output_router_logits"] = True
        common = dict(
            beta=beta,
            alpha=alpha,
            nll_on_prompt=self.orpo.nll_on_prompt,
            nll_denominator=nll_denominator,
            pair_denominator=pair_denominator,
        )
        if self.use_fused:
            kwargs["output_hidden_states"] = True
            if self._accepts_logits_to_keep:
                kwargs["logits_to_keep"] = 1
            outputs = model(**kwargs)
            hidden = outputs.hidden_states[-1]
            weight, bias = self._lm_head(model)
            if not self._fused_checked:
                self._check_fused(outputs, hidden, weight, bias)
            if gather_index is not None:
                hidden = gather_pair_rows(hidden, gather_index)
            out = orpo_loss_from_hidden(
                hidden,
                weight,
                bias,
                inputs["input_ids"],
                inputs["attention_mask"],
                inputs["completion_mask"],
                chunk_size=self.orpo.chunk_size,
                logit_scale=self._logit_scale,
                softcap=self._softcap,
                matmul_dtype=self._matmul_dtype(weight),
                **common,
            )
        else:
            outputs = model(**kwargs)
            logits = outputs.logits if gather_index is None else gather_pair_rows(outputs.logits, gather_index)
            out = orpo_loss_from_logits(
                logits, inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"], **common
            )
        aux = getattr(outputs, "aux_loss", None) if self.aux_enabled else None
        return out, aux

    def share_batch(self, config, inputs: dict[str, Any]) -> bool:
        """Whether this batch runs with prompt sharing: ``orpo.prompt_sharing`` when a bool;
        for ``auto``, :func:`orpo_core.training.sharing.sharing_pays` on the batch's prompt / chosen /
        rejected lengths (never when a row exceeds the model's sliding window)."""
        if self.prompt_sharing is not True and self.prompt_sharing != "auto":
            return False
        if self.prompt_sharing is True:
            return True
        attn = inputs["attention_mask"].sum(1)
        comp = inputs["completion_mask"].sum(1)
        half = attn.shape[0] // 2
        prompt = (attn[:half] - comp[:half]).tolist()
        if prompt != (attn[half:] - comp[half:]).tolist() or min(prompt) <= 0:
            return False  # not a shareable pair batch: let the plain path handle it
        chosen, rejected = comp[:half].tolist(), comp[half:].tolist()
        window = sliding_window_of(config)
        if window is not None and max(p + max(c, r) for p, c, r in zip(prompt, chosen, rejected)) > window:
            return False
        segment = (getattr(config, "_attn_implementation", None) or "eager") in (SEGMENT_SDPA,) + FLASH_ATTENTION
        return sharing_pays(
            prompt, chosen, rejected, padding_free=self.padding_free, config=config, segment_attention=segment
        )

    def _model_inputs(self, model, inputs) -> tuple[dict[str, Any], torch.Tensor | None]:
        """The model's keyword arguments for this batch and the ``[2B, T]`` gather index of its
        outputs (None: the model runs on the padded ``[2B, T]`` batch itself)."""
        base = _unwrap_peft(self.accelerator.unwrap_model(model))
        config = base.config
        share = self.share_batch(config, inputs)
        if self.padding_free:
            packed = build_packed_batch(
                inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"], share_prompts=share
            )
            attn = getattr(config, "_attn_implementation", None) or "eager"
            kwargs = packed.model_kwargs(attn, sliding_window_of(config), mask_dtype=self._eager_mask_dtype(base))
            return kwargs, packed.gather_index
        if share:
            shared = self._shared_batch(model, inputs)
            kwargs = {
                "input_ids": shared.input_ids,
                "attention_mask": shared.attention_mask,
                "position_ids": shared.position_ids,
            }
            return kwargs, shared.gather_index
        return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}, None

    def _eager_mask_dtype(self, base) -> torch.dtype:
        """dtype of an additive mask for eager attention (the scores' dtype; float32 under autocast)."""
        emb = base.get_input_embeddings()
        dtype = emb.weight.dtype if emb.weight.is_floating_point() else torch.float32
        if self.args.bf16 or self.args.fp16:
            dtype = torch.float32  # scores may be upcast; finfo(float32).min still masks
        return dtype

    def _shared_batch(self, model, inputs):
        """The shared layout of a pair batch for ``model`` (mask convention per attention kernel).

        Raises:
            NotImplementedError: the model's sliding-window attention would be bypassed (a row
                longer than the window)."""
        base = _unwrap_peft(self.accelerator.unwrap_model(model))
        config = base.config
        attn = getattr(config, "_attn_implementation", None) or "eager"
        if attn in ("sdpa", SEGMENT_SDPA):
            mask_dtype = torch.bool  # sdpa: True = attend
        else:  # eager adds the mask to the attention scores
            mask_dtype = self._eager_mask_dtype(base)
        pad = getattr(self.processing_class, "pad_token_id", None) if self.processing_class is not None else None
        shared = build_shared_batch(
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs["completion_mask"],
            mask_dtype=mask_dtype,
            pad_token_id=int(pad) if pad is not None else 0,
        )
        window = sliding_window_of(config)
        if window is not None and shared.logical_length > window:
            raise NotImplementedError(
                f"orpo.prompt_sharing: a row of {shared.logical_length} tokens exceeds the model's sliding window "
                f"({window}), which a custom 4D attention mask would bypass; set orpo.prompt_sharing: false"
            )
        return shared

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Training loss of one micro-batch, normalised over the accumulation window.

        ``num_items_in_batch`` is the dict from :meth:`get_batch_samples`; without it
        (a direct call) the loss is this batch's own mean. Non-finite losses are handled
        per ``orpo.on_nonfinite`` (see module docstring)."""
        beta, alpha = self.current_coefficients()
        nll_den = pair_den = None
        if isinstance(num_items_in_batch, dict):
            nll_den, pair_den = num_items_in_batch["nll_tokens"], num_items_in_batch["pairs"]
        out, aux = self.orpo_forward(
            model, inputs, beta=beta, alpha=alpha, nll_denominator=nll_den, pair_denominator=pair_den
        )
        loss = out.loss
        n_pairs = inputs["input_ids"].shape[0] // 2
        if aux is not None and self.aux_coef:
            share = n_pairs / pair_den if pair_den is not None else 1.0
            loss = loss + self.aux_coef * aux.to(loss.dtype) * share
        self._micro_step += 1
        if not bool(torch.isfinite(loss.detach())):
            loss = self._handle_nonfinite_loss(model, loss, inputs)
        else:
            metrics = dict(out.metrics)
            if aux is not None:
                metrics["aux_loss"] = aux.detach().float()
            self._store("train", metrics)
        if pair_den is not None and self.accelerator.num_processes > 1:
            # DDP averages gradients over processes; the window denominators are global sums
            loss = loss * self.accelerator.num_processes
        return (loss, out) if return_outputs else loss

    def _handle_nonfinite_loss(self, model, loss, inputs):
        step = self.state.global_step + 1
        what = (
            f"non-finite ORPO loss ({float(loss.detach())}) at global step {step} "
            f"(micro-batch {self._micro_step}, batch {_describe_batch(inputs)})"
        )
        if self.orpo.on_nonfinite == "raise":
            raise NonFiniteLossError(what + "; set orpo.on_nonfinite: skip to drop such batches")
        self.skipped_nonfinite += 1
        logger.warning("%s: skipped (orpo.on_nonfinite: skip)", what)
        # a zero loss connected to every trainable parameter: zero gradient, and DDP still
        # sees a gradient for each parameter so the processes stay in step
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:  # pragma: no cover
            return loss.detach() * 0
        return torch.stack([p.reshape(-1)[0].float() * 0.0 for p in trainable]).sum()

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if self.args.fp16 or grad_norm is None:  # fp16: the grad scaler handles inf/NaN steps
            return grad_norm
        value = float(grad_norm)
        if math.isfinite(value):
            return grad_norm
        what = f"non-finite gradient norm ({value}) at global step {self.state.global_step + 1}"
        if self.orpo.on_nonfinite == "raise":
            raise NonFiniteLossError(what + "; set orpo.on_nonfinite: skip to drop such steps")
        logger.warning("%s: optimizer step skipped (orpo.on_nonfinite: skip)", what)
        if self.accelerator.is_main_process:  # the norm is global: count the step once, not per process
            self.skipped_nonfinite += 1
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def total_skipped_nonfinite(self) -> int:
        """Skipped micro-batches/steps of this session summed over processes (a collective
        call under DDP: every process must call it)."""
        n = torch.tensor([float(self.skipped_nonfinite)], device=self.args.device)
        if self.args.world_size > 1:
            n = self.accelerator.gather(n).sum()
        return int(n.sum().item())

    # ------------------------------------------------------------------ evaluation
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation loss of one batch (its own token/pair means) and stored ``eval_`` metrics."""
        inputs = self._prepare_inputs(inputs)
        beta, alpha = self.current_coefficients()
        with torch.no_grad():
            out, aux = self.orpo_forward(model, inputs, beta=beta, alpha=alpha)
            loss = out.loss.detach()
            if aux is not None and self.aux_coef:
                loss = loss + self.aux_coef * aux.detach().to(loss.dtype)
        metrics = dict(out.metrics)
        if aux is not None:
            metrics["aux_loss"] = aux.detach().float()
        self._store("eval", metrics)
        return loss, None, None

    # ------------------------------------------------------------------ metrics
    def _store(self, mode: str, metrics: dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            if k in METRIC_NAMES:
                self._stored[mode][k].append(v.detach().float().reshape(()))

    def _reduce_stored(self, mode: str) -> dict[str, float]:
        """Means of the stored metrics over micro-batches and processes (fixed key order
        so every process takes part in the same collective)."""
        stored = self._stored[mode]
        self._stored[mode] = defaultdict(list)
        device = self.args.device
        rows = []
        for k in METRIC_NAMES:
            vals = stored.get(k, [])
            if vals:
                t = torch.stack([v.to(device) for v in vals])
                rows.append(torch.stack([t.sum(), torch.tensor(float(len(vals)), device=device)]))
            else:
                rows.append(torch.zeros(2, device=device))
        extra = torch.tensor([float(self.skipped_nonfinite), 1.0], device=device)
        table = torch.stack(rows + [extra]).to(torch.float64 if device.type == "cpu" else torch.float32)
        if self.args.world_size > 1:
            table = self.accelerator.gather(table.unsqueeze(0)).sum(0)
        out = {}
        for k, (s, n) in zip(METRIC_NAMES, table[:-1].tolist()):
            if n > 0:
                out[k] = s / n
        if mode == "train":
            out["skipped_nonfinite"] = table[-1, 0].item()
        return out

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the stored metric means to Trainer's log record: train metrics to records with
        ``loss``, ``eval_``-prefixed metrics to evaluation records (TRL ``ORPOTrainer.log``)."""
        if "loss" in logs:
            logs.update(self._reduce_stored("train"))
            if self.orpo.beta_schedule.type != "constant" or self.orpo.alpha_schedule.type != "constant":
                beta, alpha = self.current_coefficients()
                logs["beta"], logs["alpha"] = beta, alpha
        elif any(k.startswith("eval_") for k in logs):
            logs.update({f"eval_{k}": v for k, v in self._reduce_stored("eval").items()})
        return super().log(logs, start_time)

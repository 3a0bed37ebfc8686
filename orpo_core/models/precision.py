"""Which floating-point precision training, evaluation and generation run in.

``train.precision: auto`` picks **bf16 mixed precision** (``torch.autocast(dtype=torch.bfloat16)``
around the forward pass, float32 master weights, float32 optimizer states, float32 loss
accumulations) where the hardware computes bf16 natively, and **fp32** everywhere else:

* CUDA: ``torch.cuda.is_bf16_supported()`` (compute capability >= 8.0: Ampere, Hopper, ...).
* CPU: the ``avx512_bf16`` (AVX512-BF16: ``VDPBF16PS`` bf16 dot products) or ``amx_bf16``
  (Intel AMX tiles) flag in ``/proc/cpuinfo``; oneDNN then runs bf16 matmuls at about twice
  the fp32 rate or more. A CPU without them emulates bf16 (conversions around fp32 math),
  which is slower than fp32, so ``auto`` stays in fp32 there. When ``/proc/cpuinfo`` cannot
  be read (macOS, a sandbox) the CPU counts as lacking them.

The CPU check can be forced with the environment variable ``ORPO_CPU_BF16`` (``1``: the CPU
counts as having native bf16, ``0``: as lacking it), e.g. to compare both branches on one
machine or in tests. Explicit ``train.precision: fp32 | bf16 | fp16`` values are not changed by
the detection (they are checked against the device in :func:`orpo_core.training.run.build_training_args`).

Evaluation (:mod:`orpo_core.evaluation.runner`) follows the same choice for its scoring forwards
(held-out pair log-probs, corpus perplexity): they run under :func:`autocast_context` on the
float32 model, the log-softmax in float32. Generation (lm-eval tasks, greedy answers, instruction
following, and the on-policy sampling of :mod:`orpo_core.data.onpolicy`) runs under autocast on
CUDA (:func:`generation_uses_autocast`) and, on a CPU, on **bf16 weights**
(:func:`generation_weights_dtype`: the model is cast once, after its scoring forwards) when the
precision is bf16. Autocast re-casts every weight at every decoding step, which on the CPU made
generation slower than fp32; bf16 weights at a large batch do not: on an idle 2-core Intel Xeon
with AMX, lm-eval's ``ifeval`` (Google's development prompts, chat template, at most 256 new
tokens) on SmolLM2-135M-Instruct took 44 s for 64 prompts at batch 64 with bf16 weights against
76 s in fp32 (prompt-level strict accuracy 0.172 vs 0.156, instruction-level 0.314 both), and
103 s for 136 prompts at batch 136 against 297 s in fp32 at batch 16 (0.154 both). Greedy answers
change with the weights' precision, so base and trained models are always compared in the same one.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

__all__ = [
    "CPU_BF16_ENV",
    "CPU_BF16_FLAGS",
    "cpu_bf16_flags",
    "choose_precision",
    "resolve_precision",
    "autocast_dtype",
    "autocast_context",
    "generation_uses_autocast",
    "generation_weights_dtype",
]

#: environment variable that forces the CPU detection (``1``/``0``)
CPU_BF16_ENV = "ORPO_CPU_BF16"
#: ``/proc/cpuinfo`` flags that mean native bf16 arithmetic
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[str, ...] | None:
    """The native-bf16 flags (of :data:`CPU_BF16_FLAGS`) the CPU reports.

    Args:
        cpuinfo: path of a Linux ``/proc/cpuinfo``-format file (the ``flags`` lines are read).

    Returns:
        The flags found, in :data:`CPU_BF16_FLAGS` order (possibly empty), or None when the
        file cannot be read or has no ``flags`` line (not Linux/x86).
    """
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    flags: set[str] = set()
    seen = False
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            seen = True
            flags.update(value.split())
    if not seen:
        return None
    return tuple(f for f in CPU_BF16_FLAGS if f in flags)


def _cpu_choice(cpuinfo: str | Path) -> tuple[str, str]:
    forced = os.environ.get(CPU_BF16_ENV)
    if forced is not None and forced.strip() != "":
        value = forced.strip().lower()
        if value in ("1", "true", "yes"):
            return "bf16", f"CPU native bf16 forced by {CPU_BF16_ENV}={forced}"
        if value in ("0", "false", "no"):
            return "fp32", f"CPU native bf16 disabled by {CPU_BF16_ENV}={forced}"
        raise ValueError(f"environment variable {CPU_BF16_ENV}={forced!r}: expected 1 or 0")
    found = cpu_bf16_flags(cpuinfo)
    if found is None:
        return "fp32", f"CPU features unknown ({cpuinfo} unreadable or without flags): fp32"
    if found:
        return "bf16", f"CPU has {'/'.join(found)} (native bf16 dot products)"
    return "fp32", "CPU lacks avx512_bf16/amx_bf16 (bf16 would be emulated, slower than fp32)"


def choose_precision(device_type: str | None = None, cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[str, str]:
    """What ``precision: auto`` means on this machine.

    Args:
        device_type: ``"cuda"`` or ``"cpu"``; None: ``"cuda"`` when ``torch.cuda.is_available()``.
        cpuinfo: the ``/proc/cpuinfo`` to read for a CPU (tests pass a file).

    Returns:
        ``(precision, reason)``: ``"bf16"`` or ``"fp32"`` and one human-readable sentence,
        e.g. ``("bf16", "CPU has avx512_bf16/amx_bf16 (native bf16 dot products)")``.

    Raises:
        ValueError: :data:`CPU_BF16_ENV` is set to something other than 1/0; an unknown
            ``device_type``.
    """
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CUDA device"
        if torch.cuda.is_bf16_supported():
            return "bf16", f"{name} supports bf16"
        return "fp32", f"{name} has no bf16 support"
    if device_type == "cpu":
        return _cpu_choice(cpuinfo)
    raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")


def resolve_precision(setting: str, device_type: str | None = None) -> tuple[str, str]:
    """``train.precision`` (``auto``/``fp32``/``bf16``/``fp16``) -> ``(precision, reason)``.

    ``auto`` goes through :func:`choose_precision`; an explicit value is returned as is with the
    reason ``"set in the recipe"``.

    Raises:
        ValueError: an unknown ``setting`` (or see :func:`choose_precision`).
    """
    if setting == "auto":
        precision, reason = choose_precision(device_type)
        return precision, f"auto: {reason}"
    if setting in ("fp32", "bf16", "fp16"):
        return setting, f"train.precision: {setting} set in the recipe"
    raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {setting!r}")


def autocast_dtype(precision: str) -> torch.dtype | None:
    """``"bf16"`` -> ``torch.bfloat16``, ``"fp16"`` -> ``torch.float16``, ``"fp32"`` -> None (no autocast).

    Raises:
        ValueError: an unknown ``precision``.
    """
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
    if precision not in table:
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    return table[precision]


def autocast_context(precision: str, device_type: str):
    """``torch.autocast(device_type, dtype)`` for ``bf16``/``fp16``, a no-op context for ``fp32``.

    Args:
        precision: ``fp32``, ``bf16`` or ``fp16`` (as resolved by :func:`resolve_precision`).
        device_type: ``"cpu"`` or ``"cuda"``.

    Raises:
        ValueError: an unknown ``precision``.
    """
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def generation_weights_dtype(precision: str, device_type: str) -> torch.dtype | None:
    """The dtype a model is cast to before generating, or None (keep its weights).

    bf16 on a CPU when ``precision`` is ``bf16`` (which ``auto`` picks only where the CPU runs bf16
    natively); None on CUDA (autocast there, :func:`generation_uses_autocast`) and for fp32 / fp16.
    """
    return torch.bfloat16 if device_type == "cpu" and precision == "bf16" else None


def generation_uses_autocast(precision: str, device_type: str) -> bool:
    """Whether greedy generation runs under :func:`autocast_context`: on CUDA when ``precision`` is
    bf16/fp16; never on CPU (measured slower than fp32 there, see the module docstring)."""
    return device_type == "cuda" and autocast_dtype(precision) is not None

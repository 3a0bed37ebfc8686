"""Checks that a GGUF export (:mod:`orpo_core.publish.gguf`) is the trained model.

Two readers of the file are compared with the safetensors model it was written from:

* transformers' GGUF loader (``from_pretrained(folder, gguf_file=NAME)``, the same path
  :mod:`orpo_core.models.sources` converts packaged GGUFs with): weights dequantized to
  float32, so an f16 export must give the same logits up to float16 rounding of the weights
  and the same greedy answers;
* llama.cpp through ``llama-cpp-python`` (optional extra ``[llamacpp]``): its own tokenizer,
  kernels and chat-template metadata.

Figures (all on token ids of the *original* tokenizer unless said otherwise):

* ``max_abs_logit_diff``: max over positions and vocabulary of ``|logit_gguf - logit_ref|``
  (float32 logits, next-token scores before softmax); ``max_abs_logit`` gives the scale;
* ``top1_agreement``: share of positions whose argmax next token is the same;
* ``greedy_equal``: share of prompts whose greedy continuation (``max_new_tokens`` tokens,
  stopping at eos) is token-for-token the same;
* ``tokenizer_equal``: share of texts the GGUF's tokenizer encodes to the same ids;
* ``chat_template_equal``: the template stored in the GGUF, rendered with llama.cpp's
  ``Jinja2ChatFormatter`` (or plain jinja2 when llama-cpp-python is absent), gives the same
  text as ``tokenizer.apply_chat_template`` for every conversation.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = [
    "load_gguf_transformers",
    "logits_of",
    "compare_logits",
    "wilson_interval",
    "greedy_ids",
    "llama_cpp_available",
    "LlamaCppRunner",
    "render_gguf_template",
    "gguf_metadata_string",
]


def load_gguf_transformers(gguf_path: str | Path):
    """(model, tokenizer) of a GGUF file through transformers' loader (float32, eval mode).

    Raises:
        OSError / ValueError: transformers cannot read the file.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    return model, tok


def logits_of(model: Any, ids: Sequence[int]) -> np.ndarray:
    """float32 next-token logits ``[len(ids), vocab]`` of a transformers causal LM for one sequence."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(ids)])).logits[0]
    return out.float().numpy()


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` of a binomial proportion ``successes / n``
    (default z: 95 %; Wilson, JASA 22 (1927) 209-212). ``(0.0, 1.0)`` when ``n == 0``.

    Raises:
        ValueError: ``successes`` outside ``[0, n]``.
    """
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes} not in [0, {n}]")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def compare_logits(ref: Sequence[np.ndarray], other: Sequence[np.ndarray]) -> dict[str, Any]:
    """Agreement of two models' next-token logits over pairs of ``[T, V]`` float arrays (same shapes).

    Returns:
        ``max_abs_logit_diff`` / ``mean_abs_logit_diff`` (logits, over positions x vocabulary),
        ``max_abs_logit`` (scale of ``ref``), ``top1_agreement`` (share of positions with the
        same argmax) and ``top1_agreement_ci95`` (its Wilson 95 % interval, positions treated as
        independent), ``positions``, ``kl_mean`` / ``kl_max`` (``KL(ref || other)`` of the
        softmax distributions, nats per position, as llama.cpp's ``llama-perplexity
        --kl-divergence``), ``disagreements`` and ``disagree_ref_gap`` (the reference's
        top-1 minus top-2 logit at the disagreeing positions: ``median`` / ``p90`` / ``max``,
        in logits) with ``ref_gap_median_all`` (the same gap over all positions, for scale).

    Raises:
        ValueError: shapes of a pair differ.
    """
    diffs, agree, n, scale, total = 0.0, 0, 0, 0.0, 0.0
    kl_sum, kl_max = 0.0, 0.0
    gaps_dis: list[np.ndarray] = []
    gaps_all: list[np.ndarray] = []
    for a, b in zip(ref, other):
        if a.shape != b.shape:
            raise ValueError(f"logit shapes differ: {a.shape} vs {b.shape}")
        d = np.abs(a - b)
        diffs = max(diffs, float(d.max()))
        total += float(d.mean()) * a.shape[0]
        scale = max(scale, float(np.abs(a).max()))
        same = a.argmax(-1) == b.argmax(-1)
        agree += int(same.sum())
        n += a.shape[0]
        la, lb = _log_softmax(a), _log_softmax(b)
        kl = (np.exp(la) * (la - lb)).sum(-1)
        kl_sum += float(kl.sum())
        kl_max = max(kl_max, float(kl.max()))
        top2 = np.sort(a, axis=-1)[:, -2:]
        gap = top2[:, 1] - top2[:, 0]
        gaps_all.append(gap)
        gaps_dis.append(gap[~same])
    lo, hi = wilson_interval(agree, n)
    dis = np.concatenate(gaps_dis) if gaps_dis else np.zeros(0)
    allg = np.concatenate(gaps_all) if gaps_all else np.zeros(0)
    return {
        "max_abs_logit_diff": diffs,
        "mean_abs_logit_diff": total / max(n, 1),
        "max_abs_logit": scale,
        "top1_agreement": agree / max(n, 1),
        "top1_agreement_ci95": [lo, hi],
        "positions": n,
        "kl_mean": kl_sum / max(n, 1),
        "kl_max": kl_max,
        "disagreements": int(n - agree),
        "disagree_ref_gap": (
            {"median": float(np.median(dis)), "p90": float(np.quantile(dis, 0.9)), "max": float(dis.max())} if dis.size else None
        ),
        "ref_gap_median_all": float(np.median(allg)) if allg.size else None,
    }


def greedy_ids(model: Any, prompt_ids: Sequence[int], max_new_tokens: int, eos_id: int | None) -> list[int]:
    """Greedy continuation (argmax each step, stop after eos) of a transformers causal LM; the new ids only."""
    import torch

    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([list(prompt_ids)]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
        )
    return out[0, len(prompt_ids):].tolist()


def llama_cpp_available() -> str | None:
    """None when ``llama_cpp`` imports, else the reason (for a pytest skip message)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError or a broken shared library
        return f"llama-cpp-python is not installed or does not load ({type(e).__name__}: {e}); pip install '.[llamacpp]'"
    return None


class LlamaCppRunner:
    """One GGUF file opened by llama.cpp (``llama_cpp.Llama``), CPU, all logits kept.

    Args:
        gguf_path: the file.
        n_ctx: context size in tokens (longest sequence evaluated).
        n_threads: CPU threads (default: ``min(2, os.cpu_count())``).
    """

    def __init__(self, gguf_path: str | Path, n_ctx: int = 1024, n_threads: int | None = None):
        from llama_cpp import Llama

        self.path = Path(gguf_path)
        threads = n_threads or min(2, os.cpu_count() or 1)
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
            self.llm = Llama(
                model_path=str(self.path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=threads, n_threads_batch=threads, seed=0
            )

    @property
    def metadata(self) -> dict[str, str]:
        """The GGUF's metadata as llama.cpp reports it (string values)."""
        return dict(self.llm.metadata)

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's token ids of ``text``, special tokens parsed, no BOS added."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 next-token logits ``[len(ids), n_vocab]`` for one sequence (fresh context)."""
        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, prompt_ids: Sequence[int], max_new_tokens: int, eos_id: int | None) -> list[int]:
        """Greedy continuation with llama.cpp's logits (argmax each step, stop after eos); new ids only."""
        self.llm.reset()
        self.llm.eval(list(prompt_ids))
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(nxt)
            if eos_id is not None and nxt == eos_id:
                break
            self.llm.eval([nxt])
        return out


def gguf_metadata_string(gguf_path: str | Path, key: str) -> str | None:
    """A string metadata value of a GGUF file read with ``gguf.GGUFReader`` (None when absent)."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get(key)
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def render_gguf_template(
    template: str, messages: list[dict[str, str]], *, bos_token: str, eos_token: str, add_generation_prompt: bool
) -> str:
    """Render a chat template stored in a GGUF the way llama.cpp's Python binding does
    (``llama_cpp.llama_chat_format.Jinja2ChatFormatter``); with plain ``jinja2`` (sandboxed,
    ``raise_exception`` defined, ``trim_blocks``/``lstrip_blocks`` as transformers) when
    llama-cpp-python is absent."""
    if llama_cpp_available() is None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        fmt = Jinja2ChatFormatter(template, eos_token=eos_token, bos_token=bos_token, add_generation_prompt=add_generation_prompt)
        return fmt(messages=messages).prompt
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=messages, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=add_generation_prompt
    )

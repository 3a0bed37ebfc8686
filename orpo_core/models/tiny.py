"""Tiny models and tokenizers built locally, for offline runs and tests.

No weights or tokenizer files are downloaded: ``build_tiny_tokenizer`` makes a
byte-level tokenizer (256 byte tokens, no merges, so any UTF-8 text round-trips)
with ChatML special tokens and chat template, or wraps the GPT-2 BPE files in
``../shared/data/tokenizers/gpt2`` (50,257 tokens) when asked for ``gpt2``.
``build_tiny_model`` writes a randomly initialised SmolLM3-architecture model
(seeded) plus that tokenizer to a folder that loads with ``from_pretrained``
like any Hub checkpoint, so everything downstream treats it as a local path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from orpo_core.config import SHARED_DIR, TinyModelConfig
from orpo_core.models.chatml import CHATML_SPECIAL_TOKENS, CHATML_TEMPLATE

def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable unicode map (openai/gpt-2 encoder.py)
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_tiny_tokenizer(kind: str = "char"):
    """Return a ``PreTrainedTokenizerFast`` with ChatML tokens and template.

    Args:
        kind: ``"char"`` (byte-level, 256 + 3 special tokens) or ``"gpt2"``
            (GPT-2 BPE from ``shared/data/tokenizers/gpt2``, 50,257 + 3 tokens).

    Raises:
        FileNotFoundError: ``gpt2`` requested and the shared tokenizer files are absent.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if kind == "char":
        vocab = {ch: i for i, ch in enumerate(_bytes_to_unicode().values())}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    elif kind == "gpt2":
        d = SHARED_DIR / "data" / "tokenizers" / "gpt2"
        if not (d / "vocab.json").is_file():
            raise FileNotFoundError(f"GPT-2 tokenizer files not found in {d}")
        tok = Tokenizer(models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
    else:
        raise ValueError(f"unknown tiny tokenizer kind {kind!r} (char, gpt2)")
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=(kind == "gpt2"))
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens(
        {
            "bos_token": CHATML_SPECIAL_TOKENS["bos"],
            "eos_token": CHATML_SPECIAL_TOKENS["eos"],
            "pad_token": CHATML_SPECIAL_TOKENS["pad"],
        }
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.model_max_length = 1 << 20
    fast.padding_side = "right"
    return fast


def tiny_model_config(cfg: TinyModelConfig, tokenizer):
    """SmolLM3Config for ``cfg`` whose vocab matches ``tokenizer`` (len(tokenizer) unless set)."""
    from transformers import SmolLM3Config

    vocab = cfg.vocab_size or len(tokenizer)
    if vocab < len(tokenizer):
        raise ValueError(f"tiny.vocab_size {vocab} < tokenizer size {len(tokenizer)}")
    return SmolLM3Config(
        vocab_size=vocab,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )


def build_tiny_model(cfg: TinyModelConfig, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a seeded random-init SmolLM3-style model and its tokenizer to ``out_dir``.

    Deterministic: the same ``cfg`` and ``seed`` give bit-identical weights. The
    folder is written to a temp sibling and renamed, so it is complete or absent.

    Returns:
        ``out_dir`` as a Path (loadable with ``AutoModelForCausalLM.from_pretrained``).
    """
    from transformers import SmolLM3ForCausalLM

    out = Path(out_dir)
    marker = out / "tiny_config.json"
    spec = {"tiny": cfg.model_dump(), "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return out
    tokenizer = build_tiny_tokenizer(cfg.tokenizer)
    config = tiny_model_config(cfg, tokenizer)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = SmolLM3ForCausalLM(config)
    finally:
        torch.random.set_rng_state(gen_state)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "tiny_config.json").write_text(json.dumps(spec, sort_keys=True))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out

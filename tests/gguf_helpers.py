"""A tiny Llama-architecture model with a small byte-level BPE tokenizer, for the GGUF tests.

The tokenizer is trained in a second (``tokenizers.trainers.BpeTrainer``, 400 tokens, ChatML
special tokens) with SmolLM2's pre-tokenizer (digits one by one, then GPT-2's regex), so the
export writes the same ``tokenizer.ggml.pre`` (``smollm``) as for the real model while the
GGUF tokenizer loads in well under a second (GPT-2's 50k merges take about 20 s).
"""

from __future__ import annotations

from pathlib import Path

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, the capital of France is Paris.",
    "Write two facts about bees. Bees make honey. Bees live in hives.",
    "12 + 30 = 42, and 7 * 6 = 42 as well.",
    "Answer in JSON with the key \"answer\": {\"answer\": \"yes\"}",
    "P.S. Remember to wrap the title in <<double angle brackets>>.",
]


def build_bpe_tokenizer(pre: str = "smollm", vocab_size: int = 400):
    """A fast byte-level BPE tokenizer with ChatML tokens and template.

    Args:
        pre: ``smollm`` (Digits(individual) + ByteLevel(regex)), ``gpt2`` (ByteLevel(regex))
            or ``bytes`` (ByteLevel without regex: no llama.cpp equivalent).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from orpo_core.models.tiny import CHATML_TEMPLATE

    tk = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre != "bytes")
    if pre == "smollm":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
    )
    tk.train_from_iterator(TEXTS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>", pad_token="<|im_end|>"
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_llama(out: Path, *, seed: int = 0, pre: str = "smollm", tied: bool = True, vocab_pad: int = 8) -> Path:
    """Save a seeded random-init ``LlamaForCausalLM`` (hidden 64, 2 layers, 4 heads, 2 KV heads)
    with :func:`build_bpe_tokenizer` to ``out``. ``initializer_range`` 0.2 gives peaked
    next-token distributions (as a trained model's), so top-1 agreement is meaningful;
    ``vocab_pad`` unused embedding rows follow the tokenizer's ids (as in padded vocabularies)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_bpe_tokenizer(pre)
    cfg = LlamaConfig(
        vocab_size=len(tok) + vocab_pad,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a misplaced norm shows in the logits
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out

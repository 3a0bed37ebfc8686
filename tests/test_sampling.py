"""TopKNucleusSampler: the same next-token distribution as transformers' temperature -> top-k -> top-p
warpers, drawn over the top k only, and usable inside ``generate``."""

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from orpo_core.models.sampling import TopKNucleusSampler


def _hf_probs(scores: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k), TopPLogitsWarper(top_p)])
    return torch.softmax(warpers(None, scores.clone()), dim=-1)


def _ours_full(sampler: TopKNucleusSampler, scores: torch.Tensor) -> torch.Tensor:
    probs, ids = sampler.distribution(scores)
    return torch.zeros_like(scores, dtype=torch.float32).scatter_(-1, ids, probs)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 50, 0.9), (1.0, 50, 1.0), (0.3, 10, 0.5), (1.5, 200, 0.95), (0.7, 50, 0.01)])
def test_distribution_is_transformers_warpers(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(0)
    # a peaked row, a flat row and LM-like rows with a long tail
    scores = torch.randn(8, 3000, generator=g) * torch.tensor([0.1, 1, 2, 3, 4, 5, 8, 12]).unsqueeze(1)
    sampler = TopKNucleusSampler(temperature, top_p, top_k)
    ours, ref = _ours_full(sampler, scores), _hf_probs(scores, temperature, top_k, top_p)
    assert torch.equal(ours > 0, ref > 0), "same support"
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)


def test_draws_follow_the_distribution_and_come_back_as_one_hot_logits():
    scores = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0, 0.0]]).repeat(20000, 1)
    sampler = TopKNucleusSampler(temperature=1.0, top_p=0.9, top_k=4, generator=torch.Generator().manual_seed(1))
    out = sampler(None, scores)
    assert out.shape == scores.shape and torch.all((out == 0).sum(-1) == 1)
    assert torch.all(torch.isinf(out) | (out == 0))
    drawn = out.argmax(-1)
    freq = torch.bincount(drawn, minlength=6).float() / len(drawn)
    expected = _hf_probs(scores[:1], 1.0, 4, 0.9)[0]
    assert freq[expected == 0].sum() == 0  # nothing outside the nucleus is ever drawn
    assert (freq - expected).abs().max() < 0.015, (freq, expected)


def test_generate_with_the_sampler_is_seeded_and_samples(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 6, 7, 8]] * 4)

    def run(seed: int, temperature: float) -> torch.Tensor:
        torch.manual_seed(seed)
        lp = LogitsProcessorList([TopKNucleusSampler(temperature, 1.0, 50)])
        return model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, logits_processor=lp, pad_token_id=0)

    a, b = run(3, 2.0), run(3, 2.0)
    assert torch.equal(a, b)  # reproducible under torch.manual_seed
    assert len({tuple(r) for r in a[:, 4:].tolist()}) > 1  # four identical prompts, different samples
    greedy = model.generate(input_ids=ids[:1], max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(run(3, 1e-4)[:1], greedy)  # a near-zero temperature is greedy


@pytest.mark.parametrize("kw", [{"temperature": 0, "top_p": 0.9}, {"temperature": 1, "top_p": 0}, {"temperature": 1, "top_p": 1.5},
                                {"temperature": 1, "top_p": 0.9, "top_k": 0}])
def test_bad_settings_raise(kw):
    with pytest.raises(ValueError):
        TopKNucleusSampler(**kw)

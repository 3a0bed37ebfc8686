"""Held-out preference metrics and perplexity, checked against independent computations.

The references here never call orpo_core.training.loss / orpo_core.evaluation scoring: each
completion is scored with its own un-padded forward pass and a float64 log_softmax.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from orpo_core.evaluation import EvalInputError, bootstrap_ci, corpus_perplexity, load_pairs, preference_metrics, score_pairs
from orpo_core.evaluation.perplexity import sliding_windows, tokenize_corpus
from orpo_core.evaluation.preference import Pair, paired_deltas
from orpo_core.data.synthetic.arithmetic import generate_arithmetic


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, tok


def _ids(tok, messages, gen):
    return list(tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=True)["input_ids"])


def make_pairs(tok, n=16, seed=3) -> list[Pair]:
    """Pairs tokenized as the tokenize stage does: prompt with generation prompt, completion =
    what the template adds after it. Every third pair gets a system turn (varied lengths)."""
    pairs = []
    for i, r in enumerate(generate_arithmetic(n, seed)):
        prompt = r["prompt"]
        if i % 3 == 0:
            prompt = [{"role": "system", "content": "You are terse." * (1 + i % 2)}] + prompt
        p = _ids(tok, prompt, True)
        c = _ids(tok, prompt + r["chosen"], False)[len(p) :]
        j = _ids(tok, prompt + r["rejected"], False)[len(p) :]
        pairs.append(Pair(p, c, j))
    return pairs


def _ref_logp(model, prompt, completion):
    """Independent: one un-padded forward, float64 log_softmax, sum over completion targets."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    targets = range(len(prompt), len(prompt) + len(completion))
    return sum(float(logp[t - 1, ids[0, t]]) for t in targets), len(completion)


def test_preference_metrics_match_hand_count(tiny):
    model, tok = tiny
    pairs = make_pairs(tok)
    beta = 0.25
    ref = [(_ref_logp(model, p.prompt, p.chosen), _ref_logp(model, p.prompt, p.rejected)) for p in pairs]
    lc = np.array([s / n for (s, n), _ in ref])
    lr = np.array([s / n for _, (s, n) in ref])
    assert np.abs(lc - lr).min() > 1e-5  # no near-ties, so the count is well defined
    wins = sum(1 for a, b in zip(lc, lr) if a > b)

    scores = score_pairs(model, pairs, pad_token_id=tok.pad_token_id, batch_size=3)  # padding + reordering
    m = preference_metrics(scores, beta=beta, bootstrap_samples=300, seed=0)

    assert m["preference/accuracy"]["value"] == wins / len(pairs)
    assert m["preference/accuracy"]["n"] == len(pairs)
    assert m["preference/margin"]["value"] == pytest.approx(beta * np.mean(lc - lr), rel=1e-4, abs=1e-7)
    ref_log_odds = (lc - lr) - (np.log(1 - np.exp(lc)) - np.log(1 - np.exp(lr)))
    assert m["preference/log_odds"]["value"] == pytest.approx(ref_log_odds.mean(), rel=1e-4, abs=1e-7)
    np.testing.assert_allclose(scores.chosen_logps, lc, rtol=1e-5)
    for key in ("preference/accuracy", "preference/margin", "preference/log_odds"):
        lo, hi = m[key]["ci95"]
        assert lo <= m[key]["value"] <= hi

    # swapping chosen and rejected flips every comparison
    swapped = [Pair(p.prompt, p.rejected, p.chosen) for p in pairs]
    ms = preference_metrics(score_pairs(model, swapped, pad_token_id=tok.pad_token_id, batch_size=5), beta=beta,
                            bootstrap_samples=0, seed=0)
    assert ms["preference/accuracy"]["value"] == pytest.approx(1 - wins / len(pairs))
    assert ms["preference/margin"]["value"] == pytest.approx(-m["preference/margin"]["value"], rel=1e-4)
    assert ms["preference/accuracy"]["ci95"] is None  # bootstrap_samples=0


def test_chosen_perplexity_is_token_weighted(tiny):
    model, tok = tiny
    pairs = make_pairs(tok, n=9, seed=11)
    ref = [_ref_logp(model, p.prompt, p.chosen) for p in pairs]
    nll, tokens = -sum(s for s, _ in ref), sum(n for _, n in ref)
    m = preference_metrics(score_pairs(model, pairs, pad_token_id=tok.pad_token_id, batch_size=4), beta=0.1,
                           bootstrap_samples=100, seed=1)
    assert m["perplexity/chosen"]["value"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert m["perplexity/chosen"]["tokens"] == tokens
    # token-weighted, not the mean of per-pair perplexities (they differ for unequal lengths)
    per_pair = np.mean([math.exp(-s / n) for s, n in ref])
    assert abs(per_pair - math.exp(nll / tokens)) > 1e-6


def test_paired_deltas_of_identical_models_are_zero(tiny):
    model, tok = tiny
    scores = score_pairs(model, make_pairs(tok, n=6), pad_token_id=tok.pad_token_id, batch_size=6)
    d = paired_deltas(scores, scores, beta=0.1, bootstrap_samples=50, seed=0)
    for key, v in d.items():
        assert v["value"] == pytest.approx(0.0, abs=1e-12), key
        assert v["ci95"] == pytest.approx([0.0, 0.0], abs=1e-12), key


def test_bootstrap_ci_seeded_and_calibrated():
    rng = np.random.default_rng(0)
    x = (rng.random(400) < 0.5).astype(float)
    stat = lambda idx: x[idx].mean(1)  # noqa: E731
    a = bootstrap_ci(stat, len(x), samples=2000, seed=7)
    assert a == bootstrap_ci(stat, len(x), samples=2000, seed=7)
    assert a != bootstrap_ci(stat, len(x), samples=2000, seed=8)
    # normal approximation of the mean's 95% interval: +-1.96 * sqrt(p(1-p)/n)
    half = 1.96 * math.sqrt(x.mean() * (1 - x.mean()) / len(x))
    assert a[0] == pytest.approx(x.mean() - half, abs=0.012)
    assert a[1] == pytest.approx(x.mean() + half, abs=0.012)
    const = np.full(50, 3.0)
    assert bootstrap_ci(lambda idx: const[idx].mean(1), 50, samples=100, seed=0) == (3.0, 3.0)
    assert bootstrap_ci(stat, 1, samples=100, seed=0) is None


def test_sliding_windows_score_every_token_once():
    for n, window, stride in [(100, 16, 5), (64, 64, 64), (10, 32, 8), (257, 50, 49)]:
        covered = []
        for w in sliding_windows(n, window, stride):
            assert w.end - w.begin <= window and w.n_targets <= w.end - w.begin
            covered += list(range(w.end - w.n_targets, w.end))
        assert covered == list(range(n))


def _ref_corpus_ppl(model, ids, window, stride):
    """Guide loop, counting exactly the shifted targets of each window."""
    ids = torch.tensor([ids])
    nll_sum, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + window, ids.size(1))
        trg_len = end - prev_end
        inp = ids[:, begin:end]
        tgt = inp.clone()
        tgt[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids=inp, labels=tgt).loss
        n_valid = int((tgt[:, 1:] != -100).sum())
        nll_sum += float(loss) * n_valid
        count += n_valid
        prev_end = end
        if end == ids.size(1):
            break
    return math.exp(nll_sum / count), count


def test_corpus_perplexity_matches_reference(tiny):
    model, tok = tiny
    text = "The quick brown fox jumps over the lazy dog. " * 8
    ids = tokenize_corpus(tok, text, max_tokens=300)
    assert len(ids) == 300
    res = corpus_perplexity(model, ids, window=64, stride=24, batch_size=4)
    ref, count = _ref_corpus_ppl(model, ids, 64, 24)
    assert res["value"] == pytest.approx(ref, rel=1e-5)
    assert res["tokens_scored"] == count == len(ids) - 1
    assert (res["window"], res["stride"]) == (64, 24)

    # one window covering everything: plain exp(mean NLL) of the whole sequence
    short = ids[:50]
    whole = corpus_perplexity(model, short, window=128, stride=128)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([short])).logits[0].double()
    ref_whole = math.exp(float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(short[1:]))))
    assert whole["value"] == pytest.approx(ref_whole, rel=1e-5)
    assert whole["window"] == 50

    with pytest.raises(ValueError, match="stride"):
        corpus_perplexity(model, ids, window=16, stride=32)


def test_tokenize_corpus_prefix_matches_full_tokenization(tiny):
    _, tok = tiny
    text = "".join(f"line {i}: ünïcödé words here\n" for i in range(400))
    full = tok(text)["input_ids"]
    assert tokenize_corpus(tok, text, max_tokens=500) == full[:500]
    assert tokenize_corpus(tok, text, max_tokens=10**6) == full
    assert tokenize_corpus(tok, text) == full


def _write(path, cols):
    pq.write_table(pa.table(cols), path)


def test_load_pairs_errors_name_file_row_field(tmp_path):
    good = {"prompt_input_ids": [[1, 2], [3]], "chosen_input_ids": [[4], [5, 6]], "rejected_input_ids": [[7], [8]]}
    _write(tmp_path / "ok.parquet", good)
    pairs = load_pairs(tmp_path / "ok.parquet")
    assert [p.chosen for p in pairs] == [[4], [5, 6]]
    assert len(load_pairs(tmp_path / "ok.parquet", max_pairs=1)) == 1

    bad = dict(good, rejected_input_ids=[[7], []])
    _write(tmp_path / "bad.parquet", bad)
    with pytest.raises(EvalInputError, match=r"bad\.parquet: row 1, field 'rejected_input_ids'"):
        load_pairs(tmp_path / "bad.parquet")
    _write(tmp_path / "nocol.parquet", {k: v for k, v in good.items() if k != "chosen_input_ids"})
    with pytest.raises(EvalInputError, match="chosen_input_ids"):
        load_pairs(tmp_path / "nocol.parquet")
    with pytest.raises(EvalInputError, match="missing.parquet does not exist"):
        load_pairs(tmp_path / "missing.parquet")

"""Precision choice (orpo_core.models.precision) and bf16 mixed-precision training.

* detection: /proc/cpuinfo flags, the ORPO_CPU_BF16 override each way, explicit recipe values;
* build_training_args: ``auto`` gives Trainer bf16 (autocast) exactly when the CPU counts as bf16-capable;
* fused loss: bf16 lm-head matmuls over float32 master weights agree with float32;
* a real bf16 run (needs a CPU with avx512_bf16/amx_bf16 or a bf16 GPU): 40 steps on the tiny
  model stay within a stated tolerance of the fp32 run's loss curve, and metrics.json records
  the choice and its reason.
"""

from __future__ import annotations

import json
import platform

import pytest
import torch

from orpo_core.models.precision import (
    CPU_BF16_ENV,
    autocast_dtype,
    choose_precision,
    cpu_bf16_flags,
    generation_weights_dtype,
    resolve_precision,
)

CPUINFO_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n"
CPUINFO_PLAIN = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n"


def _native_bf16() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(cpu_bf16_flags())


# --------------------------------------------------------------------------- detection
def test_cpuinfo_flags_parsed(tmp_path):
    yes, no, odd = tmp_path / "yes", tmp_path / "no", tmp_path / "odd"
    yes.write_text(CPUINFO_BF16)
    no.write_text(CPUINFO_PLAIN)
    odd.write_text("Processor: ARMv8\nFeatures: fp asimd\n")
    assert cpu_bf16_flags(yes) == ("avx512_bf16", "amx_bf16")
    assert cpu_bf16_flags(no) == ()
    assert cpu_bf16_flags(odd) is None  # no flags line: unknown
    assert cpu_bf16_flags(tmp_path / "missing") is None


def test_cpu_detection_each_way_from_cpuinfo(tmp_path, monkeypatch):
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    yes, no = tmp_path / "yes", tmp_path / "no"
    yes.write_text(CPUINFO_BF16)
    no.write_text(CPUINFO_PLAIN)
    prec, reason = choose_precision("cpu", cpuinfo=yes)
    assert prec == "bf16" and "avx512_bf16" in reason and "amx_bf16" in reason
    prec, reason = choose_precision("cpu", cpuinfo=no)
    assert prec == "fp32" and "lacks" in reason
    prec, reason = choose_precision("cpu", cpuinfo=tmp_path / "missing")
    assert prec == "fp32" and "unknown" in reason


def test_env_override_forces_each_way(tmp_path, monkeypatch):
    yes, no = tmp_path / "yes", tmp_path / "no"
    yes.write_text(CPUINFO_BF16)
    no.write_text(CPUINFO_PLAIN)
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    prec, reason = choose_precision("cpu", cpuinfo=yes)
    assert prec == "fp32" and CPU_BF16_ENV in reason
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    prec, reason = choose_precision("cpu", cpuinfo=no)
    assert prec == "bf16" and CPU_BF16_ENV in reason
    monkeypatch.setenv(CPU_BF16_ENV, "maybe")
    with pytest.raises(ValueError, match=CPU_BF16_ENV):
        choose_precision("cpu", cpuinfo=yes)


def test_resolve_explicit_values_and_errors(monkeypatch):
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert resolve_precision("auto", "cpu")[0] == "bf16"
    assert resolve_precision("auto", "cpu")[1].startswith("auto: ")
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert resolve_precision("auto", "cpu")[0] == "fp32"
    for explicit in ("fp32", "bf16", "fp16"):  # never changed by the detection
        assert resolve_precision(explicit, "cpu") == (explicit, f"train.precision: {explicit} set in the recipe")
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("int8", "cpu")
    with pytest.raises(ValueError, match="device_type"):
        choose_precision("tpu")
    assert autocast_dtype("bf16") is torch.bfloat16 and autocast_dtype("fp32") is None
    with pytest.raises(ValueError):
        autocast_dtype("auto")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU branch of build_training_args")
def test_training_args_follow_the_detection(tmp_path, monkeypatch):
    from orpo_train_entry import make_recipe

    from orpo_core.training.run import TrainInputError, build_training_args

    rec = make_recipe(tmp_path / "r")
    assert rec.train.precision == "auto"
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    args = build_training_args(rec, tmp_path / "out", has_eval=False)
    assert args.bf16 and not args.fp16 and args.use_cpu
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    args = build_training_args(rec, tmp_path / "out", has_eval=False)
    assert not args.bf16 and not args.fp16
    # explicit values are kept whatever the CPU
    bf = make_recipe(tmp_path / "b", train={"precision": "bf16"})
    assert build_training_args(bf, tmp_path / "out", has_eval=False).bf16
    with pytest.raises(TrainInputError, match="fp16 needs a CUDA GPU"):
        build_training_args(make_recipe(tmp_path / "h", train={"precision": "fp16"}), tmp_path / "out", has_eval=False)


# --------------------------------------------------------------------------- fused loss in bf16
@pytest.mark.parametrize("chunk_size", [8, 64])  # recomputing backward / one-pass
def test_fused_bf16_matmuls_agree_with_fp32(chunk_size):
    from test_fused import grads, make_inputs

    from orpo_core.training.fused import orpo_loss_from_hidden

    hidden, weight, bias, ids, attn, comp = make_inputs(B=3, T=24, H=32, V=300, seed=11)
    params = [hidden, weight, bias]
    ref = orpo_loss_from_hidden(hidden, weight, bias, ids, attn, comp, beta=0.1, chunk_size=chunk_size)
    out = orpo_loss_from_hidden(hidden, weight, bias, ids, attn, comp, beta=0.1, chunk_size=chunk_size,
                                matmul_dtype=torch.bfloat16)
    # float32 loss and metrics, float32 gradients for the float32 master weights
    assert out.loss.dtype == torch.float32 and out.chosen_logps.dtype == torch.float32
    g_out, g_ref = grads(out, params), grads(ref, params)
    assert all(g.dtype == torch.float32 for g in g_out)
    assert out.loss.item() != ref.loss.item()  # the matmuls really ran in bf16
    # bf16 has an 8-bit mantissa (relative rounding 2^-9 = 0.2 %) on the logits' inputs
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-2)
    assert torch.allclose(out.chosen_logps, ref.chosen_logps, rtol=1e-2, atol=2e-2)
    for a, b in zip(g_out, g_ref):
        err = float((a - b).abs().max() / b.abs().max())
        assert err < 3e-2, err


# --------------------------------------------------------------------------- a real bf16 run
STEPS = 40
#: largest relative difference |loss_bf16 - loss_fp32| / loss_fp32 allowed at any of the 40 logged
#: steps: 1 %. Measured on the project's 2-core AVX512-BF16 CPU: 9e-5 (bf16 rounds each matmul
#: input by up to 2^-9 = 0.2 %, the per-token errors average out over the batch's tokens, and the
#: float32 master weights keep the two runs from drifting apart over 40 steps at lr 3e-3)
LOSS_CURVE_RTOL = 0.01


@pytest.mark.skipif(not _native_bf16(), reason="no native bf16 here (CPU without avx512_bf16/amx_bf16, GPU without bf16)")
def test_bf16_run_tracks_the_fp32_loss_curve(tmp_path, monkeypatch):
    from orpo_train_entry import build_tokenized, make_recipe

    from orpo_core.training.run import run_training

    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    train = {"max_steps": STEPS, "logging_steps": 1, "per_device_train_batch_size": 4, "learning_rate": 3e-3,
             "warmup_steps": 2, "group_by_length": False}
    prep = make_recipe(tmp_path / "prep", n_rows=100, train=train)
    tokenized = build_tokenized(prep)
    curves, metrics = {}, {}
    for name, precision in (("fp32", "fp32"), ("auto", "auto")):
        rec = make_recipe(tmp_path / name, n_rows=100, train={**train, "precision": precision})
        result = run_training(rec, tokenized, rec.out_dir / "train")
        assert result["global_step"] == STEPS
        history = json.loads((rec.out_dir / "train" / "log_history.json").read_text())
        curves[name] = [r["loss"] for r in history if "loss" in r and "train_loss" not in r]
        metrics[name] = json.loads((rec.out_dir / "train" / "metrics.json").read_text())
    auto = metrics["auto"]["precision"]
    assert auto["setting"] == "auto" and auto["used"] == "bf16" and auto["autocast"] is True
    assert auto["trainable_dtype"] == "float32"  # master weights
    assert "bf16" in auto["reason"]
    assert metrics["fp32"]["precision"]["used"] == "fp32" and metrics["fp32"]["precision"]["autocast"] is False
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":  # CPU training kept its freed memory
        assert metrics["auto"]["heap_retained"] is (not torch.cuda.is_available())
    fp32, bf16 = curves["fp32"], curves["auto"]
    assert len(fp32) == len(bf16) == STEPS
    assert fp32 != bf16 and max(abs(b - f) for f, b in zip(fp32, bf16)) > 0  # autocast changed the arithmetic
    rel = [abs(b - f) / abs(f) for f, b in zip(fp32, bf16)]
    assert max(rel) <= LOSS_CURVE_RTOL, (max(rel), fp32, bf16)
    # both learn: the last 5 steps' mean loss is well below the first 5 steps'
    for c in (fp32, bf16):
        assert sum(c[-5:]) < 0.8 * sum(c[:5]), c


# --------------------------------------------------------------------------- where the choice is shown
def test_model_card_and_artifact_rows_show_the_choice(tmp_path):
    from orpo_train_entry import make_recipe

    from orpo_core.publish.card import build_model_card, hyperparameter_rows
    from tasks.artifacts import stats_rows

    rec = make_recipe(tmp_path / "r")
    record = {"setting": "auto", "used": "bf16", "reason": "auto: CPU has avx512_bf16/amx_bf16 (native bf16 dot products)",
              "autocast": True, "trainable_dtype": "float32"}
    rows = dict(hyperparameter_rows(rec, record))
    assert rows["precision"] == ("bf16 mixed precision (autocast, float32 master weights; "
                                 "auto: CPU has avx512_bf16/amx_bf16 (native bf16 dot products))")
    assert dict(hyperparameter_rows(rec))["precision"] == "auto"  # no record: the recipe's setting
    fp32 = {"setting": "auto", "used": "fp32", "reason": "auto: CPU lacks avx512_bf16/amx_bf16", "autocast": False}
    assert dict(hyperparameter_rows(rec, fp32))["precision"] == "fp32 (auto: CPU lacks avx512_bf16/amx_bf16)"
    card = str(build_model_card(rec, None, train_metrics={"precision": record, "global_step": 3}))
    assert "| precision | bf16 mixed precision (autocast, float32 master weights; auto: CPU has avx512_bf16" in card
    # the Prefect train artifact is a key/value table of metrics.json
    table = {r["key"]: r["value"] for r in stats_rows({"precision": record})}
    assert table["precision.used"] == "bf16" and table["precision.reason"].startswith("auto: CPU has")


# --------------------------------------------------------------------------- evaluation
def test_evaluation_scores_under_autocast_and_generates_on_bf16_weights_on_cpu(tmp_path):
    import numpy as np
    from orpo_train_entry import build_tokenized, make_recipe
    from transformers import AutoTokenizer

    from orpo_core.evaluation import loading
    from orpo_core.evaluation.generation import build_prompts
    from orpo_core.evaluation.preference import load_pairs
    from orpo_core.evaluation.runner import evaluate_model
    from orpo_core.models.sources import resolve_model_path

    rec = make_recipe(tmp_path / "r", n_rows=40)
    tokenized = build_tokenized(rec)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenized / "tokenizer"))
    pairs = load_pairs(tokenized / "test.parquet")
    src = loading.validate_model_source(resolve_model_path(rec.model, rec.out_dir, rec.seed), role="base model")
    model = loading.load_eval_model(src, tokenizer, dtype="float32", device="cpu")
    seen: list[tuple[bool, torch.dtype]] = []  # (autocast on, weight dtype) of each forward
    model.register_forward_hook(lambda m, args, kw, out: seen.append((torch.is_autocast_enabled("cpu"), m.lm_head.weight.dtype))
                                if "input_ids" in kw else None, with_kwargs=True)
    prompts = build_prompts(tokenizer, ["1 + 1 ="], [], 0)
    runs = {}
    for precision in ("fp32", "bf16"):
        seen.clear()
        runs[precision] = evaluate_model(model, tokenizer, recipe=rec, pairs=pairs, corpus_ids=None, tasks=[],
                                         prompts=prompts, include_dir=None, precision=precision)
        flags = [on for on, _ in seen]
        dtypes = [d for _, d in seen]
        n_score = -(-len(pairs) // rec.eval.batch_size)  # the first forwards score the pairs
        assert flags[:n_score] == [precision == "bf16"] * n_score and set(dtypes[:n_score]) == {torch.float32}
        assert not any(flags[n_score:]) and len(flags) > n_score  # no autocast while generating on a CPU
        # generation: bf16 weights when evaluating in bf16 (cast after scoring), fp32 otherwise
        assert set(dtypes[n_score:]) == {torch.bfloat16 if precision == "bf16" else torch.float32}
    assert generation_weights_dtype("bf16", "cpu") is torch.bfloat16
    assert generation_weights_dtype("fp32", "cpu") is None and generation_weights_dtype("bf16", "cuda") is None
    a, b = runs["fp32"]["scores"], runs["bf16"]["scores"]
    assert not np.array_equal(a.chosen_logp_sum, b.chosen_logp_sum)  # bf16 really ran
    assert np.allclose(a.chosen_logp_sum, b.chosen_logp_sum, rtol=2e-2, atol=0.5)
    assert np.allclose(a.rejected_logp_sum, b.rejected_logp_sum, rtol=2e-2, atol=0.5)


# --------------------------------------------------------------------------- packing / sharing in bf16
@pytest.mark.parametrize("sharing", [False, True])
def test_packed_segment_attention_under_autocast_matches_padded(tmp_path, tiny_model_dir, tiny_tok, sharing):
    """Padding-free (segment sdpa, which casts q/k/v once per row under autocast) and prompt
    sharing under bf16 autocast agree with the padded bf16 batch: the same loss, log-probs and
    gradients up to bf16 rounding (the fp32 tests hold them to 1e-5)."""
    from layout_checks import assert_same_outputs, layout_trainer, loss_and_grads
    from test_packing import SPEC, _rows

    from orpo_core.training.collator import ORPODataCollator
    from orpo_core.training.packing import SEGMENT_SDPA

    rows = _rows(SPEC, vocab=min(len(tiny_tok), 250))
    tr = layout_trainer(tmp_path, tiny_model_dir, tiny_tok, rows, orpo={"padding_free": True, "prompt_sharing": False},
                        max_steps=1, precision="bf16")
    assert tr.args.bf16 and tr.model.config._attn_implementation == SEGMENT_SDPA
    batch = tr._prepare_inputs(ORPODataCollator(tiny_tok.pad_token_id)(rows))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, g_plain = loss_and_grads(tr, batch, padding_free=False, sharing=False)
        packed, g_packed = loss_and_grads(tr, batch, padding_free=True, sharing=sharing)
    assert all(g.dtype == torch.float32 for g in g_packed.values())
    assert_same_outputs(packed, plain, g_packed, g_plain, tol=3e-2)

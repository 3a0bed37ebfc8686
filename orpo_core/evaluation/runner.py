"""The evaluation stage: trained (and base) model on held-out pairs, corpus, lm-eval tasks."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from orpo_core.stages import fields_hash

from . import base_cache, harness, loading
from .errors import EvalInputError
from .generation import build_prompts, generate_answers
from .instruction_following import (
    answer_and_score,
    constraints_summary,
    heldout_prompts,
    instruction_metrics,
    paired_instruction_deltas,
    per_instruction_accuracy,
    side_by_side,
)
from .lm_eval_paired import paired_lm_eval_deltas, side_by_side_samples, verdicts
from .perplexity import corpus_perplexity, read_corpus, tokenize_corpus
from .preference import PairScores, load_pairs, paired_deltas, preference_metrics, score_pairs
from .report import load_log_history, write_report

log = logging.getLogger("orpo_core.evaluation")

SCHEMA = "orpo-eval/1"

logger = logging.getLogger(__name__)


def _model_window(model, window: int) -> int:
    limit = getattr(model.config, "max_position_embeddings", None)
    return min(window, limit) if isinstance(limit, int) and limit > 1 else window


def evaluate_model(
    model,
    tokenizer,
    *,
    recipe,
    pairs,
    corpus_ids: list[int] | None,
    tasks: list[harness.ResolvedTask],
    prompts,
    include_dir: str | None,
    instructions=None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """All metrics of one loaded model.

    ``precision`` (``fp32``/``bf16``/``fp16``, see :mod:`orpo_core.models.precision`): the scoring
    forwards (held-out pairs, corpus) run under autocast in that dtype; generation and lm-eval
    under autocast where :func:`orpo_core.models.precision.generation_uses_autocast` says so (CUDA),
    and on weights cast to :func:`orpo_core.models.precision.generation_weights_dtype` (bf16 on a
    CPU in bf16; the cast happens after the scoring forwards, on the model passed in).

    Returns:
        ``{"metrics": {key: detail}, "scores": PairScores | None, "answers": [...],
        "lm_eval": {...} , "corpus": {...} | None, "instructions": FollowResult | None,
        "timing_s": {...}}``.
    """
    from orpo_core.models.precision import autocast_context, generation_uses_autocast, generation_weights_dtype

    ev = recipe.eval
    device_type = next(model.parameters()).device.type
    score_ctx = lambda: autocast_context(precision, device_type)  # noqa: E731
    gen_ctx = lambda: autocast_context(precision if generation_uses_autocast(precision, device_type) else "fp32", device_type)  # noqa: E731
    out: dict[str, Any] = {
        "metrics": {}, "scores": None, "answers": [], "lm_eval": None, "corpus": None, "instructions": None, "timing_s": {}
    }
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    if pairs and (ev.preference or ev.perplexity):
        t0 = time.perf_counter()
        with score_ctx():
            scores = score_pairs(model, pairs, pad_token_id=pad, batch_size=ev.batch_size)
        m = preference_metrics(scores, beta=recipe.orpo.beta, bootstrap_samples=ev.bootstrap_samples, seed=recipe.seed)
        for k, v in m.items():
            if (k.startswith("preference/") and ev.preference) or (k.startswith("perplexity/") and ev.perplexity):
                out["metrics"][k] = v
        out["scores"] = scores
        out["timing_s"]["pairs"] = time.perf_counter() - t0
    if corpus_ids is not None:
        t0 = time.perf_counter()
        window = _model_window(model, ev.window or recipe.data.max_length)
        stride = min(ev.stride, window)
        with score_ctx():
            c = corpus_perplexity(model, corpus_ids, window=window, stride=stride, batch_size=ev.batch_size)
        out["corpus"] = c
        out["metrics"]["perplexity/corpus"] = {
            "value": c["value"],
            "n": c["tokens_scored"],
            "ci95": None,
            "nll_mean": c["nll_mean"],
            "window": c["window"],
            "stride": c["stride"],
            "n_windows": c["n_windows"],
        }
        out["timing_s"]["corpus"] = time.perf_counter() - t0
    gen_dtype = generation_weights_dtype(precision, device_type)
    if gen_dtype is not None and (tasks or prompts or instructions):
        model = model.to(gen_dtype)  # after the scoring forwards: lm-eval and generation on bf16 weights (CPU)
    gen_batch = ev.generation_batch_size or ev.batch_size
    if tasks:
        t0 = time.perf_counter()
        # lm-eval mixes log-likelihood and generation requests: it follows the generation rule
        with gen_ctx():
            res = harness.run_lm_eval(
                model,
                tokenizer,
                tasks,
                limit=ev.limit,
                batch_size=gen_batch,
                bootstrap_iters=ev.bootstrap_samples,
                seed=recipe.seed,
                include_dir=include_dir,
                max_gen_toks=ev.lm_eval_max_gen_toks,
                apply_chat_template=ev.lm_eval_chat_template,
            )
        out["lm_eval"] = res
        out["metrics"].update(res["metrics"])
        out["timing_s"]["lm_eval"] = time.perf_counter() - t0
    if prompts:
        t0 = time.perf_counter()
        with gen_ctx():
            out["answers"] = generate_answers(model, tokenizer, prompts, max_new_tokens=ev.max_new_tokens)
        out["timing_s"]["generation"] = time.perf_counter() - t0
    if instructions:
        t0 = time.perf_counter()
        with gen_ctx():
            res = answer_and_score(model, tokenizer, instructions, max_new_tokens=ev.max_new_tokens, batch_size=gen_batch)
        out["instructions"] = res
        out["metrics"].update(instruction_metrics(res, bootstrap_samples=ev.bootstrap_samples, seed=recipe.seed))
        out["timing_s"]["instructions"] = time.perf_counter() - t0
    return out


def _base_through_cache(evaluate_source, src, cache_dir: Path, *, recipe, tokenizer, pairs, corpus_ids, tasks, prompts,
                        instructions, precision: str, device_type: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The base model's per-model result: read from :mod:`.base_cache` when an earlier evaluation stored
    it under the same key, else evaluated (``evaluate_source``) and stored. Holds the key's file lock
    meanwhile, so a concurrent evaluation of the same base waits and then reuses.

    Returns:
        ``(run, model description, base_cache record)``.
    """
    t0 = time.perf_counter()
    info = loading.describe_source(src)
    parts = base_cache.key_parts(recipe, info, tokenizer=tokenizer, pairs=pairs, corpus_ids=corpus_ids, tasks=tasks,
                                 prompts=prompts, instructions=instructions, precision=precision, device_type=device_type)
    if parts is None:
        run, info = evaluate_source("base", src, info)
        return run, info, {"status": "off", "reason": f"no weights sha256 for {src.name_or_path} (not a local folder)"}
    key = base_cache.cache_key(parts)
    path = base_cache.entry_path(cache_dir, key).resolve()
    with base_cache.locked(cache_dir, key):
        hit = base_cache.load_entry(cache_dir, key)
        if hit is not None:
            log.info("base model %s: results reused from %s (same weights, inputs and settings)", src.name_or_path, path)
            run = hit["run"]
            run["timing_s"] = {"cache": time.perf_counter() - t0, "original": run.get("timing_s")}
            for k in ("n_parameters", "dtype", "commit"):
                if k in hit["model"] and k not in info:
                    info[k] = hit["model"][k]
            return run, info, {"status": "reused", "path": str(path), "key": key, "evaluated_utc": hit.get("created_utc")}
        run, info = evaluate_source("base", src, info)
        base_cache.store_entry(cache_dir, key, parts, info, run)
    return run, info, {"status": "stored", "path": str(path), "key": key}


def _unprepared_skips(ev, tokenized_dir: Path) -> list[str]:
    """What an evaluation without the prepared run (``tokenized_dir``) cannot measure."""
    out = []
    if ev.preference or ev.perplexity:
        out.append(
            "held-out preference metrics (accuracy, margin, log-odds) and chosen perplexity: "
            f"they need the tokenized held-out pairs in {tokenized_dir} (run `orpo prep RECIPE`)"
        )
    if not ev.prompts and ev.n_prompts > 0:
        out.append(f"generations for {ev.n_prompts} held-out prompts: no prepared data and no eval.prompts")
    if not ev.corpus and ev.perplexity:
        out.append("corpus perplexity: eval.corpus is not set")
    if not ev.tasks:
        out.append("lm-eval tasks: eval.tasks is empty")
    return out


def run_evaluation(
    recipe,
    model_dir: str | Path,
    tokenized_dir: str | Path,
    out_dir: str | Path,
    base_model: str | Path | None = None,
    log_history: str | Path | list | None = None,
    *,
    allow_unprepared: bool = False,
    model_label: str | None = None,
    reuse_base: bool = True,
    base_cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate the trained model (and the base model) and write the report.

    Steps: validate every input (no model loaded yet); load the tokenizer from
    ``tokenized_dir/tokenizer``; then for the trained model and, when
    ``eval.compare_base``, the base model (``base_model`` or ``recipe.model`` resolved
    with :func:`orpo_core.models.sources.resolve_model_path`, embeddings resized to the
    tokenizer): held-out preference metrics and chosen perplexity
    (:mod:`.preference`), corpus perplexity (:mod:`.perplexity`, when ``eval.corpus``),
    lm-eval tasks (:mod:`.harness`, when ``eval.tasks``), greedy answers to a few
    prompts (:mod:`.generation`) and, when ``eval.instructions``, instruction following
    on the held-out prompts with verifiable constraints (:mod:`.instruction_following`;
    the rows with ``constraints`` of ``tokenized_dir/../data/test.parquet``, or the
    recipe's regenerated ``instructions`` held-out split when that file does not exist).
    Models are loaded one at a time and freed.

    Args:
        recipe: the :class:`orpo_core.config.Recipe` (sections ``model``, ``data``,
            ``orpo`` for beta, ``eval``).
        model_dir: the trained model folder (merged weights or PEFT adapter).
        tokenized_dir: the tokenize stage's folder (``test.parquet``, ``tokenizer/``).
        out_dir: where ``eval.json``, ``eval.md`` and ``curves.png`` go.
        base_model: base model path or Hub id (None: from the recipe).
        log_history: Trainer log history (list, or path to ``log_history.json``) for
            ``curves.png``.
        allow_unprepared: when ``tokenized_dir`` (or its ``tokenizer/``) does not exist,
            evaluate anyway with the model's own tokenizer and chat template
            (:func:`.loading.load_model_tokenizer`), run only what needs no prepared data
            (corpus perplexity, lm-eval tasks, fixed ``eval.prompts``) and list what was
            skipped in ``skipped`` (eval.json, eval.md). False: a missing tokenizer is an error.
        model_label: how eval.md names the evaluated model (``labels`` in eval.json), e.g.
            ``model`` when it is evaluated alone and is not the run's trained model. The
            eval.json keys stay ``trained`` / ``base``.
        reuse_base: reuse the base model's results stored by an earlier evaluation with the same
            base weights, inputs and settings (:mod:`.base_cache`) instead of evaluating it again,
            and store them after evaluating it. ``base_cache`` in eval.json says which happened.
        base_cache_dir: where those results live (None: ``<recipe output_dir>/eval-cache``).

    Returns:
        The content of ``eval.json``: ``results`` (``{"trained"|"base": {metric: value}}``
        with keys ``preference/accuracy``, ``preference/margin``, ``preference/log_odds``,
        ``perplexity/chosen``, ``perplexity/corpus``, ``lm_eval/<task>/<metric>``,
        ``instructions/prompt_level_strict_acc``, ``instructions/inst_level_strict_acc``),
        ``deltas`` (trained − base), ``metrics`` (each value with ``n`` and ``ci95`` or
        lm-eval ``stderr``/version/n-shot), ``delta_details`` (paired bootstrap CIs; for lm-eval's
        IFEval tasks from its per-prompt results, :mod:`.lm_eval_paired`),
        ``models`` (path, kind, revision, weight/config sha256), ``settings``,
        ``lm_eval`` (task versions, n-shot, higher_is_better, data files; ``samples``: each
        model's per-document IFEval verdicts; ``examples``: answers side by side),
        ``base_cache`` (``status``: ``reused`` / ``stored`` / ``off``, ``path`` of the entry, ``key``,
        ``evaluated_utc`` when reused; None without a base model),
        ``instructions`` (source, prompt count, constraint counts, accuracy per
        instruction, per-prompt verdicts, answers side by side; None when not run),
        ``generations``, ``timing_s``, ``files``.

    Raises:
        EvalInputError: missing/invalid model folder, tokenizer, held-out file, corpus
            or log history, unknown lm-eval task, missing offline task file. All of
            these are checked before any model is loaded.
    """
    t_start = time.perf_counter()
    ev = recipe.eval
    mcfg = recipe.require_model()
    # ------------------------------------------------------------ validate (no model loaded)
    trained_src = loading.validate_model_source(model_dir, role="trained model", must_be_local=True)
    tokenized_dir = Path(tokenized_dir)
    tok_dir = tokenized_dir / "tokenizer"
    prepared = tok_dir.is_dir() and (tok_dir / "tokenizer_config.json").is_file()
    skipped: list[str] = []
    if not prepared and not allow_unprepared:
        raise EvalInputError(
            f"tokenizer folder {tok_dir} does not exist or has no tokenizer_config.json "
            "(prepare the run with `orpo prep RECIPE`, or evaluate a model on its own with `orpo eval RECIPE --model PATH`)"
        )
    test_path = tokenized_dir / "test.parquet"
    need_pairs = ev.preference or ev.perplexity or (not ev.prompts and ev.n_prompts > 0)
    if not prepared:
        tok_src = loading.model_tokenizer_source(trained_src)
        skipped += _unprepared_skips(ev, tokenized_dir)
        need_pairs = False
    pairs = load_pairs(test_path, ev.max_pairs) if need_pairs else []
    corpus_text = read_corpus(ev.corpus) if (ev.perplexity and ev.corpus) else None
    tasks = harness.resolve_tasks(list(ev.tasks), ev.tasks_dir) if ev.tasks else []
    history = load_log_history(log_history)
    instr_prompts, instr_source = (
        heldout_prompts(recipe, tokenized_dir.parent / "data" / "test.parquet", ev.max_instructions)
        if ev.instructions
        else ([], None)
    )
    base_src = None
    if ev.compare_base and base_model is None:
        from orpo_core.models.sources import resolve_model_path

        base_model = resolve_model_path(mcfg, recipe.out_dir, recipe.seed)
        if Path(base_model).exists() and Path(base_model).resolve() == Path(model_dir).expanduser().resolve():
            logger.warning("the model is the recipe's base model: evaluated once, without a comparison")
            ev.compare_base, base_model = False, None
            model_label = model_label or "model"
    if ev.compare_base:
        revision = mcfg.revision if str(base_model) == mcfg.name_or_path else None
        base_src = loading.validate_model_source(base_model, role="base model", revision=revision)

    # ------------------------------------------------------------ shared inputs
    from transformers import AutoTokenizer

    if prepared:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    else:
        tokenizer = loading.load_model_tokenizer(
            tok_src, chat_template=mcfg.chat_template, trust_remote_code=mcfg.trust_remote_code
        )
    corpus_ids = None
    if corpus_text is not None:
        corpus_ids = tokenize_corpus(tokenizer, corpus_text, ev.corpus_max_tokens)
        if len(corpus_ids) < 2:
            raise EvalInputError(f"corpus file {ev.corpus} has fewer than 2 tokens")
    prompts = build_prompts(tokenizer, list(ev.prompts), [p.prompt for p in pairs], ev.n_prompts)
    notes: list[str] = []
    if ev.instructions and not instr_prompts and any(
        s.synthetic is not None and s.synthetic.task == "instructions" for s in recipe.data.sources
    ):
        notes.append("no held-out instruction prompts with constraints were found: instruction following was skipped.")
    if need_pairs and not pairs:
        notes.append(f"{test_path} has no rows: held-out preference metrics and chosen perplexity were skipped.")

    # ------------------------------------------------------------ evaluate each model
    import tempfile

    from orpo_core.models.precision import generation_uses_autocast, generation_weights_dtype, resolve_precision

    device_type = loading.resolve_device().type
    precision, precision_reason = resolve_precision(recipe.train.precision, device_type)
    if precision == "fp16" and device_type != "cuda":
        precision, precision_reason = "fp32", "train.precision: fp16 needs CUDA: evaluating in fp32"
    if mcfg.dtype not in ("auto", "float32"):
        precision, precision_reason = "fp32", f"model.dtype {mcfg.dtype}: the weights are already low precision"
    log.info("evaluation precision: %s (%s)", precision, precision_reason)
    runs: dict[str, dict[str, Any]] = {}
    models_info: dict[str, Any] = {}
    base_reuse: dict[str, Any] | None = None
    order = [("trained", trained_src)] + ([("base", base_src)] if base_src is not None else [])
    with tempfile.TemporaryDirectory(prefix="orpo-lm-eval-") as include_dir:

        def evaluate_source(label: str, src, info: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
            log.info("evaluating %s model %s", label, src.name_or_path)
            t0 = time.perf_counter()
            model = loading.load_eval_model(src, tokenizer, dtype=mcfg.dtype, trust_remote_code=mcfg.trust_remote_code,
                                            attn_implementation=mcfg.attn_implementation, seed=recipe.seed)
            load_s = time.perf_counter() - t0
            info = loading.add_model_facts(info, model) if info is not None else loading.describe_source(src, model)
            run = evaluate_model(
                model,
                tokenizer,
                recipe=recipe,
                pairs=pairs,
                corpus_ids=corpus_ids,
                tasks=tasks,
                prompts=prompts,
                include_dir=str(Path(include_dir) / label),
                instructions=instr_prompts,
                precision=precision,
            )
            run["timing_s"]["load"] = load_s
            del model
            loading.free_memory()
            return run, info

        for label, src in order:
            if label == "base" and reuse_base:
                cache_dir = Path(base_cache_dir) if base_cache_dir is not None else recipe.out_dir / base_cache.DIR_NAME
                runs[label], models_info[label], base_reuse = _base_through_cache(
                    evaluate_source, src, cache_dir, recipe=recipe, tokenizer=tokenizer, pairs=pairs,
                    corpus_ids=corpus_ids, tasks=tasks, prompts=prompts, instructions=instr_prompts,
                    precision=precision, device_type=device_type,
                )
            else:
                runs[label], models_info[label] = evaluate_source(label, src)
    if base_src is not None and base_reuse is None:
        base_reuse = {"status": "off", "reason": "reuse_base=False"}

    # ------------------------------------------------------------ assemble
    metrics = {label: r["metrics"] for label, r in runs.items()}
    results = {label: {k: v["value"] for k, v in m.items()} for label, m in metrics.items()}
    deltas: dict[str, float] = {}
    delta_details: dict[str, dict[str, Any]] = {}
    if "base" in results:
        for k, v in results["trained"].items():
            b = results["base"].get(k)
            if isinstance(v, (int, float)) and isinstance(b, (int, float)):
                deltas[k] = float(v) - float(b)
                delta_details[k] = {"value": deltas[k], "n": metrics["trained"][k].get("n"), "ci95": None}
        ts: PairScores | None = runs["trained"]["scores"]
        bs: PairScores | None = runs["base"]["scores"]
        if ts is not None and bs is not None:
            paired = paired_deltas(ts, bs, beta=recipe.orpo.beta, bootstrap_samples=ev.bootstrap_samples, seed=recipe.seed)
            for k, v in paired.items():
                if k in delta_details:
                    delta_details[k] = v
        ti, bi = runs["trained"].get("instructions"), runs["base"].get("instructions")
        if ti is not None and bi is not None:
            paired_if = paired_instruction_deltas(ti, bi, bootstrap_samples=ev.bootstrap_samples, seed=recipe.seed)
            for k, v in paired_if.items():
                if k in delta_details:
                    delta_details[k] = v
        base_samples = (runs["base"].get("lm_eval") or {}).get("samples") or {}
        for task, ts_ in ((runs["trained"].get("lm_eval") or {}).get("samples") or {}).items():
            if task in base_samples:
                paired_lm = paired_lm_eval_deltas(task, ts_, base_samples[task], bootstrap_samples=ev.bootstrap_samples, seed=recipe.seed)
                for k, v in paired_lm.items():
                    if k in delta_details:
                        delta_details[k] = v
    instructions_info = None
    follow = {label: r["instructions"] for label, r in runs.items() if r.get("instructions") is not None}
    if follow:
        instructions_info = {
            "source": instr_source,
            "n_prompts": len(instr_prompts),
            "max_prompts": ev.max_instructions,
            "max_new_tokens": ev.max_new_tokens,
            "constraints": constraints_summary(instr_prompts),
            "per_instruction": {label: per_instruction_accuracy(instr_prompts, f) for label, f in follow.items()},
            "examples": side_by_side(instr_prompts, follow, ev.instruction_examples),
            "per_prompt": {
                label: [{"origin": p.origin, "follow": fl} for p, fl in zip(instr_prompts, f.follow)]
                for label, f in follow.items()
            },
        }
    generations = []
    for i, p in enumerate(prompts):
        g = {"prompt": p.text, "source": p.source}
        for label in ("base", "trained"):
            if label in runs and i < len(runs[label]["answers"]):
                g[label] = runs[label]["answers"][i]
        generations.append(g)
    corpus_info = None
    if corpus_ids is not None:
        c = runs["trained"]["corpus"]
        corpus_info = {
            "path": str(Path(ev.corpus).resolve()),
            "tokens": len(corpus_ids),
            "max_tokens": ev.corpus_max_tokens,
            "window": c["window"],
            "stride": c["stride"],
            "configured_window": ev.window,
            "configured_stride": ev.stride,
        }
    lm_info = None
    if tasks:
        lm_info = {
            "lm_eval_version": runs["trained"]["lm_eval"].get("lm_eval_version"),
            "tasks": runs["trained"]["lm_eval"]["tasks"],
            "tasks_dir": str(harness.resolve_tasks_dir(ev.tasks_dir)),
        }
        samples = {label: (r.get("lm_eval") or {}).get("samples") or {} for label, r in runs.items()}
        if any(samples.values()):
            lm_info["samples"] = {label: {t: verdicts(v) for t, v in by_task.items()} for label, by_task in samples.items()}
            shown = [lb for lb in ("base", "trained") if lb in samples]
            lm_info["examples"] = {
                t: side_by_side_samples(t, {lb: samples[lb][t] for lb in shown if t in samples[lb]}, ev.instruction_examples)
                for t in samples["trained"]
            }
    gate_value = results["trained"].get(ev.gate_metric)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "run_name": recipe.run_name,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "models": models_info,
        "results": results,
        "deltas": deltas,
        "metrics": metrics,
        "delta_details": delta_details,
        "gate": {"metric": ev.gate_metric, "mode": ev.gate_mode, "value": gate_value},
        "settings": {
            "seed": recipe.seed,
            "beta": recipe.orpo.beta,
            "bootstrap_samples": ev.bootstrap_samples,
            "batch_size": ev.batch_size,
            "heldout_file": str(test_path.resolve()) if need_pairs else None,
            "tokenizer_dir": str(tok_dir.resolve()) if prepared else tok_src.name_or_path,
            "prepared": prepared,
            "n_pairs": len(pairs),
            "max_pairs": ev.max_pairs,
            "corpus": corpus_info,
            "lm_eval": {
                "tasks": list(ev.tasks),
                "limit": ev.limit,
                "tasks_dir": ev.tasks_dir,
                "max_gen_toks": ev.lm_eval_max_gen_toks,
                "chat_template": ev.lm_eval_chat_template,
            },
            "max_new_tokens": ev.max_new_tokens,
            "precision": {
                "scoring": precision,
                "generation": (
                    "bf16 weights" if generation_weights_dtype(precision, device_type) is not None
                    else f"{precision} autocast" if generation_uses_autocast(precision, device_type) else "fp32"
                ),
                "generation_batch_size": ev.generation_batch_size or ev.batch_size,
                "reason": precision_reason,
            },
            "eval_fields_hash": fields_hash(recipe, "evaluate"),
        },
        "lm_eval": lm_info,
        "base_cache": base_reuse,
        "instructions": instructions_info,
        "generations": generations,
        "timing_s": {label: r["timing_s"] for label, r in runs.items()},
        "notes": notes,
        "skipped": skipped,
        "labels": {"trained": model_label} if model_label and model_label != "trained" else {},
    }
    if gate_value is None and ev.gate_metric:
        notes.append(f"gate metric {ev.gate_metric!r} was not computed in this evaluation.")
    report["timing_s"]["total"] = time.perf_counter() - t_start
    write_report(report, out_dir, history)
    return report

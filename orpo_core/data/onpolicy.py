"""On-policy preference pairs for instruction following: the model answers IFEval-like
requests, IFEval's checks judge the answers, and a failing answer is paired with its minimal
repair.

For each request (:func:`orpo_core.data.synthetic.instructions.requests.make_requests`) the
model being trained samples one answer through its chat template. Then, checked with lm-eval's
IFEval checkers (:mod:`orpo_core.data.synthetic.instructions.checks`):

* the answer breaks an instruction and :func:`~orpo_core.data.synthetic.instructions.repair.repair`
  can edit it (its unfinished last sentence cut when the token budget ended it,
  :func:`complete_sentences`) into one that follows all of them: ``chosen`` = the repaired answer,
  ``rejected`` = the model's own answer (the pair differs only where an instruction asks);
* the answer already follows every instruction, or cannot be repaired: no pair (counted).

This is the "on-policy, minimally repaired" recipe of the project's issue 20; rejected answers
are exactly what the model writes today, so the odds-ratio term pushes down its own failure
modes. Rows are in the normalized schema (``prompt`` = [user message], ``chosen`` /
``rejected`` = [assistant message]) plus ``constraints`` (JSON: IFEval's
``instruction_id_list`` and ``kwargs``), ``kind`` and ``topic``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from orpo_core.data.synthetic.instructions.checks import check
from orpo_core.data.synthetic.instructions.repair import repair

__all__ = ["SOURCE", "build_pairs", "complete_sentences", "generate_onpolicy", "judge", "onpolicy_source", "pairs_file", "sample_answers"]

SOURCE = "onpolicy:instructions"
log = logging.getLogger(__name__)
_CLOSED = re.compile(r"""[.!?]["')\]*]*$""")


def complete_sentences(text: str) -> str:
    """``text`` without a trailing unfinished sentence (an answer cut by the token budget).

    Text that already ends with ``.``, ``!`` or ``?`` (optionally followed by closing quotes,
    brackets or ``*``) is returned unchanged; otherwise it is cut after the last such end, or
    returned unchanged when it has none.
    """
    t = text.rstrip()
    if not t or _CLOSED.search(t):
        return t
    ends = [m.end() for m in re.finditer(r"""[.!?]["')\]*]*(?=\s)""", t)]
    return t[: ends[-1]] if ends else t


def sample_answers(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
    temperature: float = 0.7,
    top_p: float = 0.9,
    top_k: int = 50,
    seed: int = 0,
) -> list[str]:
    """One sampled answer per prompt, through the tokenizer's chat template.

    Args:
        model: a causal LM (eval mode, on its device).
        tokenizer: its tokenizer, with a chat template.
        prompts: user messages.
        max_new_tokens: generation budget per answer (tokens).
        batch_size: prompts per ``generate`` call (left padding; prompts are sorted by length
            so a batch pads little, and answers are returned in input order).
        temperature, top_p, top_k: sampling settings (``temperature <= 0``: greedy), transformers'
            temperature -> top-k -> top-p chain, drawn over the top k only
            (:class:`~orpo_core.models.sampling.TopKNucleusSampler`: the same distribution, without
            sorting and sampling the whole vocabulary every step).
        seed: ``torch.manual_seed`` before each batch (reproducible on one machine).

    Returns:
        the decoded answers (special tokens removed, stripped), aligned with ``prompts``.
    """
    import torch
    from transformers import LogitsProcessorList

    from orpo_core.models.sampling import TopKNucleusSampler

    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = [""] * len(texts)
    device = next(model.parameters()).device
    try:
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            torch.manual_seed(seed + b)
            kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": pad_id}
            kw["do_sample"] = False  # greedy emits the sampler's draw when sampling
            if temperature > 0:
                kw["logits_processor"] = LogitsProcessorList([TopKNucleusSampler(temperature, top_p, top_k)])
            with torch.inference_mode():
                gen = model.generate(**enc, **kw)
            for row, i in enumerate(idx):
                out[i] = tokenizer.decode(gen[row, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
            log.info("sampled %d / %d answers", min(b + batch_size, len(order)), len(order))
    finally:
        tokenizer.padding_side = side
    return out


def judge(requests: list[dict[str, Any]], answers: list[str]) -> list[list[bool]]:
    """IFEval's strict verdicts (:func:`~orpo_core.data.synthetic.instructions.checks.check`) of each answer
    to its request: one list of bools per request, one bool per instruction."""
    return [check(a, r["instruction_id_list"], r["kwargs"], r["prompt"]) for r, a in zip(requests, answers)]


def build_pairs(
    requests: list[dict[str, Any]], answers: list[str], verdicts: list[list[bool]] | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Preference rows from answers judged by IFEval's checks (see the module docstring).

    Args:
        requests: IFEval-format rows (``prompt``, ``instruction_id_list``, ``kwargs``, ``kind``, ``topic``).
        answers: one answer per request.
        verdicts: IFEval's strict verdicts of each answer when the caller has them already
            (:func:`judge`); None: judged here.

    Returns:
        (rows, stats). ``stats``: ``n_requests``, ``answers_following_all`` (prompt-level
        strict accuracy of the sampled answers), ``answers_instruction_acc``, ``pairs``,
        ``unrepairable``, ``empty_answers`` and per instruction id ``{"n", "followed", "pairs"}``.

    Raises:
        ValueError: ``answers`` and ``requests`` differ in length.
    """
    if len(requests) != len(answers):
        raise ValueError(f"{len(requests)} requests but {len(answers)} answers")
    rows: list[dict[str, Any]] = []
    per: dict[str, dict[str, int]] = {}
    n_follow = n_inst = n_inst_ok = n_unrep = n_empty = 0
    if verdicts is None:
        verdicts = judge(requests, answers)
    for k, (req, ans, follow) in enumerate(zip(requests, answers, verdicts)):
        n_inst += len(follow)
        n_inst_ok += sum(follow)
        for iid, ok in zip(req["instruction_id_list"], follow):
            d = per.setdefault(iid, {"n": 0, "followed": 0, "pairs": 0})
            d["n"] += 1
            d["followed"] += int(ok)
        if not ans.strip():
            n_empty += 1
            continue
        if all(follow):
            n_follow += 1
            continue
        fixed = repair(complete_sentences(ans), req, pick=k)
        if fixed is None:
            n_unrep += 1
            continue
        for iid in req["instruction_id_list"]:
            per[iid]["pairs"] += 1
        rows.append({
            "prompt": [{"role": "user", "content": req["prompt"]}],
            "chosen": [{"role": "assistant", "content": fixed}],
            "rejected": [{"role": "assistant", "content": ans}],
            "source": SOURCE,
            "constraints": json.dumps([{"id": i, "kwargs": kw} for i, kw in zip(req["instruction_id_list"], req["kwargs"])]),
            "kind": req.get("kind"),
            "topic": req.get("topic"),
        })
    stats = {
        "n_requests": len(requests),
        "answers_following_all": n_follow / len(requests) if requests else None,
        "answers_instruction_acc": n_inst_ok / n_inst if n_inst else None,
        "pairs": len(rows),
        "unrepairable": n_unrep,
        "empty_answers": n_empty,
        "per_instruction": dict(sorted(per.items())),
        "created_unix": time.time(),
    }
    return rows, stats


def onpolicy_source(recipe):
    """The recipe's ``onpolicy`` source config (:class:`orpo_core.config.OnPolicyConfig`; the recipe
    allows at most one), or None."""
    return next((s.onpolicy for s in recipe.data.sources if s.onpolicy is not None), None)


def pairs_file(out_dir: str | Path) -> Path:
    """The generate stage's pairs: ``<out_dir>/pairs.jsonl`` (normalized rows, one JSON object a line)."""
    return Path(out_dir) / "pairs.jsonl"


def generate_onpolicy(recipe, out_dir: str | Path) -> dict[str, Any]:
    """The ``generate`` stage: on-policy pairs from the recipe's base model (see module docstring).

    Writes, atomically (a staging folder replaces ``out_dir``): ``pairs.jsonl`` (normalized
    rows), ``answers.jsonl`` (every request with the model's answer and IFEval's verdicts, for
    inspection) and ``stats.json`` (requests: drawn / kept / dropped as contaminated /
    paraphrased; answers: prompt- and instruction-level strict accuracy of the base model on
    the requests; pairs per instruction id; seconds; the benchmark file's sha256).

    Args:
        recipe: a :class:`orpo_core.config.Recipe` with one ``onpolicy`` source and a model.
        out_dir: the stage folder (``<run>/onpolicy``).

    Returns:
        the stats dict.

    Raises:
        ValueError: no ``onpolicy`` source.
        FileNotFoundError: the ``decontaminate`` benchmark file does not exist (named).
        orpo_core.models.loading.ModelLoadError, orpo_core.models.chat.TokenizerLoadError: the model.
    """
    import torch

    from orpo_core.io import staging_dir
    from orpo_core.models.chat import load_tokenizer
    from orpo_core.models.loading import load_model
    from orpo_core.models.precision import generation_weights_dtype, resolve_precision

    from .synthetic.instructions.decontaminate import NgramIndex, benchmark_info
    from .synthetic.instructions.requests import make_requests

    cfg = onpolicy_source(recipe)
    if cfg is None:
        raise ValueError("the recipe has no 'onpolicy' source in data.sources")
    bench = Path(cfg.decontaminate).expanduser()
    if not bench.is_file():
        raise FileNotFoundError(f"data.sources[onpolicy].decontaminate: benchmark file {bench} does not exist")
    seed = cfg.seed if cfg.seed is not None else recipe.seed
    t0 = time.perf_counter()
    requests, req_stats = make_requests(cfg.n_requests, seed=seed, index=NgramIndex.from_ifeval(bench),
                                        max_instructions=cfg.max_instructions)
    tokenizer, added = load_tokenizer(recipe.require_model(), recipe.out_dir, recipe.seed)
    model = load_model(recipe, tokenizer, added, for_training=False)
    device_type = next(model.parameters()).device.type
    precision, reason = resolve_precision(recipe.train.precision, device_type)
    gen_dtype = generation_weights_dtype(precision, device_type)
    if gen_dtype is not None:
        model = model.to(gen_dtype)
    t1 = time.perf_counter()
    answers = sample_answers(model, tokenizer, [r["prompt"] for r in requests], max_new_tokens=cfg.max_new_tokens,
                             batch_size=cfg.batch_size, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                             seed=seed)
    t2 = time.perf_counter()
    verdicts = judge(requests, answers)
    rows, pair_stats = build_pairs(requests, answers, verdicts=verdicts)
    stats = {
        "source": SOURCE,
        "settings": cfg.model_dump() | {"seed": seed},
        "benchmark": benchmark_info(bench),
        "requests": req_stats,
        **{k: v for k, v in pair_stats.items() if k != "created_unix"},
        "generated_tokens_budget": cfg.n_requests * cfg.max_new_tokens,
        "timing_s": {"load": round(t1 - t0, 2), "generate": round(t2 - t1, 2), "total": round(time.perf_counter() - t0, 2)},
        "torch_threads": torch.get_num_threads(),
        "precision": {"generation": str(gen_dtype or next(model.parameters()).dtype).replace("torch.", ""), "reason": reason},
    }
    with staging_dir(out_dir) as tmp:
        with (tmp / "pairs.jsonl").open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        with (tmp / "answers.jsonl").open("w", encoding="utf-8") as f:
            for req, ans, follow in zip(requests, answers, verdicts):
                f.write(json.dumps({**req, "answer": ans, "follow": follow}, ensure_ascii=False) + "\n")
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return stats

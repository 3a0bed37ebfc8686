"""Prefect task: on-policy pairs from the base model (``orpo_core.data.onpolicy.generate_onpolicy``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from .options import cached_task_options
from .stage import run_file_stage


def onpolicy_markdown(stats: dict[str, Any], run_name: str) -> str:
    """The generate stage's artifact: requests, the base model's IFEval-style accuracy on them, pairs per instruction."""
    req = stats["requests"]
    acc = stats.get("answers_following_all")
    inst = stats.get("answers_instruction_acc")
    lines = [
        f"# On-policy pairs of {run_name}",
        "",
        f"- requests: {req['kept']} kept of {req['drawn']} drawn; {req['dropped_contaminated']} dropped for sharing a "
        f"13-gram with {Path(stats['benchmark']['path']).name}; {req['paraphrased']} instruction texts paraphrased",
        f"- the model's sampled answers follow every instruction in {acc:.1%} of requests, "
        f"{inst:.1%} of instructions (lm-eval's IFEval checks)" if acc is not None and inst is not None else "- no answers",
        f"- pairs: **{stats['pairs']}** (failing answer vs its minimal repair); unrepairable {stats['unrepairable']}, "
        f"empty {stats['empty_answers']}",
        f"- generation: {stats['timing_s']['generate']:.0f} s for {req['kept']} answers of at most "
        f"{stats['settings']['max_new_tokens']} tokens",
        "",
        "| instruction | requests | followed | pairs |",
        "|---|---:|---:|---:|",
    ]
    for iid, d in stats["per_instruction"].items():
        lines.append(f"| `{iid}` | {d['n']} | {d['followed']} | {d['pairs']} |")
    return "\n".join(lines) + "\n"


@task(**cached_task_options("generate"), description="On-policy pairs: the base model answers IFEval-like requests; failing answers vs their repair.")
def generate_task(recipe: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """Run the generate stage into ``out_dir`` (``<run>/onpolicy``).

    Returns:
        ``{"stage": "generate", "path": out_dir, "stats": <stats.json>, "content_hash": ...}``.
        Cached on the model fields, the data sources (the ``onpolicy`` budget), the seed, the
        benchmark file's content and the code version (:mod:`orpo_core.runs.cache`).

    Raises:
        ValueError: no ``onpolicy`` source; FileNotFoundError: missing benchmark file.
    """
    from orpo_core.data.onpolicy import generate_onpolicy

    return run_file_stage("generate", recipe, out_dir, generate_onpolicy, onpolicy_markdown, "onpolicy", "On-policy pairs")

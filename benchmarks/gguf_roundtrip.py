"""GGUF round trip on the main job's model: export f16 + q8_0, read back with transformers and llama.cpp.

Model: ``--model`` (a safetensors folder), else the main job's trained model
``runs/smollm2-instructions/train/model`` when present, else -- as a stand-in -- the packaged
SmolLM2-135M-Instruct converted to float32 safetensors (:mod:`orpo_core.models.sources`); the
output names which one ran.

Held-out data: the test split of the recipe's own data (``prepare_dataset`` into a temporary
folder; for ``smollm2-instructions`` 120 instruction prompts from (constraint, topic) keys held
out from training). Texts = chat-template rendering of prompt + chosen answer; prompts = the
held-out instruction prompts with the generation prompt.

Figures (see :mod:`orpo_core.publish.gguf_roundtrip`), all against the safetensors model in float32:

* f16 via transformers' GGUF loader: max / mean |logit diff| over every position of the texts,
  top-1 agreement, greedy answers token-for-token equal (``--max-new-tokens``);
* q8_0 via transformers: top-1 next-token agreement (target >= 98 %), logit diffs;
* with each comparison: the Wilson 95 % interval of top-1 agreement, KL(float32 || GGUF) per
  position, and the float32 model's top-1 minus top-2 logit gap at the disagreeing positions
  (:func:`orpo_core.publish.gguf_roundtrip.compare_logits`); ``benchmarks/gguf_q8_diagnose.py``
  splits a q8_0 loss by tensor group and by llama.cpp's activation rounding;
* with llama-cpp-python: the same for f16 and q8_0 through llama.cpp, token ids of the texts
  equal to the tokenizer's, and the GGUF's chat template rendered by llama.cpp's
  ``Jinja2ChatFormatter`` equal to ``tokenizer.apply_chat_template``.

Exit status 1 when a check fails: f16 greedy answers not all equal, f16 max |logit diff| above
``--f16-tol`` (transformers, default 0.05 logits: weights rounded to f16) or ``--llama-f16-tol``
(llama.cpp, default 0.2: its CPU matmuls with f16 weights also round the activations to f16),
q8_0 top-1 agreement below 0.98 (transformers and llama.cpp), a tokenization or chat-template
difference.

    nice -n 5 python benchmarks/gguf_roundtrip.py --json gguf_roundtrip.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _reader_checks(checks: list[tuple[str, bool]], reader: str, q: str, cmp: dict, same_tok: float, template_equal: bool,
                   f16_tol: float, greedy, prompt_ids: list[list[int]], ref_greedy: list[list[int]]) -> dict:
    """The figures and pass/fail checks of one reader (transformers / llama.cpp) on one GGUF type:
    f16 greedy answers equal and max |logit diff| <= ``f16_tol``; q8_0 top-1 agreement >= 0.98;
    tokenization and chat template equal. Appends to ``checks``; returns the figures."""
    entry = {**cmp, "tokenizer_equal": same_tok, "chat_template_equal": template_equal}
    if q == "f16":
        t0 = time.perf_counter()
        entry["greedy_equal"] = sum(greedy(ids) == want for ids, want in zip(prompt_ids, ref_greedy)) / len(prompt_ids)
        entry["greedy_seconds"] = round(time.perf_counter() - t0, 1)
        checks += [(f"{reader} f16 greedy answers equal", entry["greedy_equal"] == 1.0),
                   (f"{reader} f16 max |logit diff| <= {f16_tol}", cmp["max_abs_logit_diff"] <= f16_tol)]
    else:
        checks.append((f"{reader} q8_0 top-1 >= 0.98", cmp["top1_agreement"] >= 0.98))
    checks += [(f"{reader} {q} tokenizer equal", same_tok == 1.0), (f"{reader} {q} chat template equal", template_equal)]
    return entry


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2-instructions.yaml"))
    ap.add_argument("--model", default=None, help="safetensors model folder (default: the run's trained model, else the base)")
    ap.add_argument("--n-texts", type=int, default=60, help="held-out texts for logits / top-1 agreement")
    ap.add_argument("--n-prompts", type=int, default=20, help="held-out prompts answered greedily")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--f16-tol", type=float, default=0.05, help="max |logit diff| allowed for f16 via transformers (logits)")
    ap.add_argument("--llama-f16-tol", type=float, default=0.2,
                    help="max |logit diff| allowed for f16 via llama.cpp (logits; its CPU kernels also round activations to f16)")
    ap.add_argument("--out-dir", default=None, help="where the GGUF files go (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orpo_core.config import load_recipe
    from orpo_core.data.prepare import prepare_dataset
    from orpo_core.publish.gguf import export_gguf
    from orpo_core.publish.gguf_roundtrip import (LlamaCppRunner, compare_logits, gguf_metadata_string, greedy_ids,
                                                  llama_cpp_available, load_gguf_transformers, logits_of, render_gguf_template)
    from orpo_core.publish.card import base_model_id
    from orpo_core.models.sources import resolve_model_path

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    recipe = load_recipe(args.recipe)
    trained = recipe.out_dir / "train" / "model"
    if args.model:
        model_dir, which = Path(args.model), f"--model {args.model}"
    elif (trained / "config.json").is_file():
        model_dir, which = trained, f"the main job's trained model ({trained})"
    else:
        model_dir = Path(resolve_model_path(recipe.require_model(), recipe.out_dir, seed=recipe.seed))
        which = f"stand-in: {trained} absent, the base model {recipe.model.name_or_path} converted to safetensors ({model_dir})"
    print(f"model: {which}", file=sys.stderr)
    report: dict = {"model": which, "load_average_start": _load_average()}

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory(prefix="gguf-roundtrip-") as tmp:
        import pyarrow.parquet as pq

        prepare_dataset(recipe, Path(tmp) / "data")
        rows = pq.read_table(Path(tmp) / "data" / "test.parquet").to_pylist()
        out_dir = Path(args.out_dir) if args.out_dir else Path(tmp) / "gguf"
        texts = [tok.apply_chat_template(r["prompt"] + r["chosen"], tokenize=False) for r in rows[: args.n_texts]]
        text_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        prompts = [r["prompt"] for r in rows[: args.n_prompts]]
        prompt_ids = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False) for p in prompts]
        report["held_out"] = {"texts": len(texts), "positions": sum(map(len, text_ids)), "prompts": len(prompts),
                              "max_new_tokens": args.max_new_tokens}

        files = {}
        for q in ("f16", "q8_0"):
            info = export_gguf(model_dir, out_dir / f"model.{q.upper()}.gguf", q, name=recipe.run_name,
                               base_model=base_model_id(recipe), recipe_yaml=recipe.to_yaml())
            files[q] = info
            print(f"exported {q}: {info['size'] / 1e6:.1f} MB in {info['seconds']} s", file=sys.stderr)
        report["files"] = {q: {k: i[k] for k in ("file", "size", "sha256", "tensor_types", "seconds")} for q, i in files.items()}

        t0 = time.perf_counter()
        ref_logits = [logits_of(ref, ids) for ids in text_ids]
        ref_greedy = [greedy_ids(ref, ids, args.max_new_tokens, tok.eos_token_id) for ids in prompt_ids]
        report["reference_seconds"] = round(time.perf_counter() - t0, 1)

        checks: list[tuple[str, bool]] = []
        for q in ("f16", "q8_0"):
            t0 = time.perf_counter()
            gmodel, gtok = load_gguf_transformers(files[q]["path"])
            load_s = time.perf_counter() - t0
            cmp = compare_logits(ref_logits, [logits_of(gmodel, ids) for ids in text_ids])
            same_tok = sum(gtok(t, add_special_tokens=False)["input_ids"] == ids for t, ids in zip(texts, text_ids)) / len(texts)
            entry = {"load_seconds": round(load_s, 1), **_reader_checks(
                checks, "transformers", q, cmp, same_tok, gtok.chat_template == tok.chat_template, args.f16_tol,
                lambda ids, m=gmodel: greedy_ids(m, ids, args.max_new_tokens, tok.eos_token_id), prompt_ids, ref_greedy)}
            report[f"transformers_{q}"] = entry
            print(f"transformers {q}: {json.dumps(entry)}", file=sys.stderr)
            del gmodel

        template = gguf_metadata_string(files["f16"]["path"], "tokenizer.chat_template")
        convs = [(p, True) for p in prompts] + [(r["prompt"] + r["chosen"], False) for r in rows[: args.n_prompts]]
        rendered_equal = sum(
            render_gguf_template(template, c, bos_token=tok.bos_token or "", eos_token=tok.eos_token, add_generation_prompt=g)
            == tok.apply_chat_template(c, tokenize=False, add_generation_prompt=g)
            for c, g in convs
        ) / len(convs)
        reason = llama_cpp_available()
        report["chat_template_render"] = {"renderer": "llama_cpp Jinja2ChatFormatter" if reason is None else "jinja2 (llama-cpp-python absent)",
                                          "equal": rendered_equal, "conversations": len(convs)}
        checks.append(("GGUF chat template rendered equal", rendered_equal == 1.0))
        if reason is None:
            import llama_cpp

            report["llama_cpp_version"] = llama_cpp.__version__
            for q in ("f16", "q8_0"):
                t0 = time.perf_counter()
                runner = LlamaCppRunner(files[q]["path"], n_ctx=1024)
                load_s = time.perf_counter() - t0
                same_tok = sum(runner.tokenize(t) == ids for t, ids in zip(texts, text_ids)) / len(texts)
                t0 = time.perf_counter()
                cmp = compare_logits(ref_logits, [runner.logits(ids) for ids in text_ids])
                entry = {"load_seconds": round(load_s, 1), "logits_seconds": round(time.perf_counter() - t0, 1), **_reader_checks(
                    checks, "llama.cpp", q, cmp, same_tok, runner.metadata.get("tokenizer.chat_template") == tok.chat_template,
                    args.llama_f16_tol, lambda ids, r=runner: r.greedy(ids, args.max_new_tokens, tok.eos_token_id), prompt_ids,
                    ref_greedy)}
                report[f"llama_cpp_{q}"] = entry
                print(f"llama.cpp {q}: {json.dumps(entry)}", file=sys.stderr)
                del runner
        else:
            report["llama_cpp"] = f"skipped: {reason}"
            print(f"llama.cpp skipped: {reason}", file=sys.stderr)
    report["checks"] = {name: ok for name, ok in checks}
    report["load_average_end"] = _load_average()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    failed = [n for n, ok in checks if not ok]
    if failed:
        print("FAILED: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

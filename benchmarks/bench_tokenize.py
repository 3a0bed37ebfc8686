"""Tokenization throughput: our batched stage vs TRL's per-row ORPO tokenization.

Both paths start from the same normalized conversational rows and end with token
ids, chat template included:

* ours: :func:`orpo_core.data.tokenize.tokenize_table` (``datasets.map(batched=True)``:
  batched template rendering, one batched fast-tokenizer call per 1,000 rows);
* TRL: what ``trl.experimental.orpo.ORPOTrainer.__init__`` does to a dataset:
  ``map(maybe_extract_prompt)``, ``map(maybe_apply_chat_template)``,
  ``map(self.tokenize_row)``, all per row (not batched); ``tokenize_row`` is TRL's own
  method, called on a minimally initialised trainer object.

Rows: ``shared/data/preference/ultrafeedback_binarized_sample_train.jsonl`` (1,000
real UltraFeedback pairs) cycled to ``--rows`` (synthetic arithmetic rows when the
shared folder is absent). Tokenizer: GPT-2 BPE from ``shared/data/tokenizers/gpt2``
with ChatML added (:func:`orpo_core.models.chat.setup_chat_format`); byte-level tiny
tokenizer when absent. max_length 1024, max_prompt_length 512 (the installed TRL's
ORPO ``tokenize_row`` has no prompt truncation any more; it only cuts completions to
``max_length - len(prompt)``).

The script also checks that both produce the same sequences, modulo TRL's extra BOS
(it prepends ``bos_token_id`` when the prompt does not start with it: GPT-2's
``<|endoftext|>``) and extra EOS (it appends ``eos_token_id`` after the template's
``<|im_end|>\\n``), on the rows neither path truncates; pairs with identical chosen
and rejected (which TRL keeps and we drop) are counted apart.

    python benchmarks/bench_tokenize.py                      # 10,000 rows, 1 process
    python benchmarks/bench_tokenize.py --rows 2000 --num-proc 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("ORPO_SHARED_DIR", ROOT.parent / "shared")) / "data"


def load_rows(n: int) -> tuple[list[dict], str]:
    path = SHARED / "preference" / "ultrafeedback_binarized_sample_train.jsonl"
    if path.is_file():
        base = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                d = json.loads(line)
                base.append(
                    {
                        "prompt": [{"role": "user", "content": d["prompt"]}],
                        "chosen": [{"role": "assistant", "content": d["chosen"]}],
                        "rejected": [{"role": "assistant", "content": d["rejected"]}],
                        "source": "ultrafeedback",
                        "score_chosen": None,
                        "score_rejected": None,
                        "origin": f"{path.name}:{i + 1}",
                    }
                )
        what = f"{path.name} ({len(base)} rows) cycled"
    else:
        from orpo_core.data.synthetic.arithmetic import generate_arithmetic

        base = generate_arithmetic(min(n, 2000), seed=0)
        what = "synthetic arithmetic rows (shared data absent)"
    return list(itertools.islice(itertools.cycle(base), n)), what


def load_tok():
    from orpo_core.models.chat import setup_chat_format
    from orpo_core.models.tiny import build_tiny_tokenizer

    d = SHARED / "tokenizers" / "gpt2"
    if not (d / "vocab.json").is_file():
        return build_tiny_tokenizer("char"), "byte-level tiny tokenizer (shared data absent)"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    setup_chat_format(tok)
    tok.model_max_length = 1 << 30  # silence "longer than model_max_length" warnings in both paths
    return tok, "GPT-2 BPE + ChatML"


def run_ours(rows, tok, max_length, max_prompt_length, num_proc):
    from orpo_core.data.schema import pairs_to_table
    from orpo_core.data.tokenize import tokenize_table

    table = pairs_to_table(rows)
    t0 = time.perf_counter()
    out, stats = tokenize_table(
        table, tok, max_length=max_length, max_prompt_length=max_prompt_length, num_proc=num_proc, file="bench"
    )
    return time.perf_counter() - t0, out, stats


def run_trl(rows, tok, max_length, num_proc):
    import datasets
    from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt
    from trl.experimental.orpo import ORPOTrainer

    from accelerate import PartialState

    PartialState()  # TRL's accelerate logger (warning_once) needs an initialised state
    trainer = ORPOTrainer.__new__(ORPOTrainer)  # only what tokenize_row reads
    trainer.is_encoder_decoder = False
    trainer.processing_class = tok
    trainer.max_length = max_length
    ds = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    procs = num_proc if num_proc > 1 else None
    t0 = time.perf_counter()
    ds = ds.map(maybe_extract_prompt, num_proc=procs)
    ds = ds.map(maybe_apply_chat_template, fn_kwargs={"processing_class": tok}, num_proc=procs)
    ds = ds.map(trainer.tokenize_row, num_proc=procs)
    return time.perf_counter() - t0, ds


def compare(ours, trl_ds, tok, max_length, max_prompt_length) -> dict:
    """How many TRL rows equal ours once TRL's extra BOS/EOS are removed.

    A TRL row is compared when neither path truncated it (its prompt fits
    ``max_prompt_length`` and prompt + longer completion fits ``max_length``); it
    matches when (prompt, chosen, rejected) without TRL's BOS/EOS is one of our rows
    (our output drops rows, so rows are matched by content, not position).
    """
    bos, eos = tok.bos_token_id, tok.eos_token_id
    mine = {
        (tuple(o["prompt_input_ids"]), tuple(o["chosen_input_ids"]), tuple(o["rejected_input_ids"]))
        for o in ours.to_pylist()
    }
    cols = trl_ds.select_columns(["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"]).to_dict()
    checked = equal = identical = 0
    for tp, tc, tr in zip(cols["prompt_input_ids"], cols["chosen_input_ids"], cols["rejected_input_ids"]):
        n = len(tp)
        p = tp[1:] if bos is not None and tp and tp[0] == bos else tp
        c, r = tc[n:], tr[n:]
        c = c[:-1] if c and c[-1] == eos else c
        r = r[:-1] if r and r[-1] == eos else r
        if len(p) > max_prompt_length or len(p) + max(len(c), len(r)) > max_length - 2:
            continue  # truncated (or at the limit) in one of the two paths
        if c == r:
            identical += 1  # TRL trains on it, we drop it (identical_completions)
            continue
        checked += 1
        equal += (tuple(p), tuple(c), tuple(r)) in mine
    return {"rows_compared": checked, "rows_equal": equal, "trl_identical_pairs_kept": identical}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--max-prompt-length", type=int, default=512)
    ap.add_argument("--num-proc", type=int, default=1, help="processes for both paths")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per path, alternating; the best is reported")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    args = ap.parse_args(argv)

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    rows, rows_what = load_rows(args.rows)
    tok, tok_what = load_tok()
    print(f"rows: {len(rows)} from {rows_what}; tokenizer: {tok_what} ({len(tok)} tokens)")
    print(f"max_length {args.max_length}, max_prompt_length {args.max_prompt_length}, num_proc {args.num_proc}, "
          f"cpus {os.cpu_count()}")

    # warm-up on a slice (imports, template compilation, the BPE word cache), then alternate the timed runs
    run_ours(rows[:500], tok, args.max_length, args.max_prompt_length, 1)
    if not args.skip_trl:
        run_trl(rows[:500], tok, args.max_length, 1)
    times_ours, times_trl = [], []
    for _ in range(args.repeats):
        t_ours, out, stats = run_ours(rows, tok, args.max_length, args.max_prompt_length, args.num_proc)
        times_ours.append(t_ours)
        if not args.skip_trl:
            t_trl, trl_ds = run_trl(rows, tok, args.max_length, args.num_proc)
            times_trl.append(t_trl)
    t_ours = min(times_ours)
    res = {
        "rows": len(rows),
        "ours_s": round(t_ours, 3),
        "ours_runs_s": [round(t, 2) for t in times_ours],
        "ours_rows_per_s": round(len(rows) / t_ours, 1),
        "ours_rows_out": stats["rows_out"],
        "ours_dropped": stats["dropped"],
        "prompt_truncated": stats["prompt_truncated"],
        "completion_truncated": stats["completion_truncated"],
        "prefix_fallback": stats["prefix_fallback"],
        "total_len_p50_p95_max": [stats["lengths_before_truncation"]["total"][k] for k in ("p50", "p95", "max")],
    }
    print(f"ours (batched):   {t_ours:8.2f} s  {res['ours_rows_per_s']:10.1f} rows/s   (runs: {res['ours_runs_s']})")
    if not args.skip_trl:
        t_trl = min(times_trl)
        res.update(
            trl_s=round(t_trl, 3),
            trl_runs_s=[round(t, 2) for t in times_trl],
            trl_rows_per_s=round(len(rows) / t_trl, 1),
            speedup=round(t_trl / t_ours, 2),
        )
        print(f"TRL (per row):    {t_trl:8.2f} s  {res['trl_rows_per_s']:10.1f} rows/s   (runs: {res['trl_runs_s']})")
        print(f"speedup (TRL time / ours, best runs): {res['speedup']:.2f}x")
        res.update(compare(out, trl_ds, tok, args.max_length, args.max_prompt_length))
        print(
            f"same ids as TRL (modulo TRL's extra BOS/EOS), rows neither path truncates: "
            f"{res['rows_equal']}/{res['rows_compared']}; identical chosen/rejected pairs TRL keeps and we drop: "
            f"{res['trl_identical_pairs_kept']}; rows tokenized with our prefix fallback: {res['prefix_fallback']}"
        )
    print(json.dumps(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

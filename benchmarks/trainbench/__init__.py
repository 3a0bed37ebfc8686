"""The pieces of ``benchmarks/bench_train.py`` (our trainer vs TRL's ``ORPOTrainer``).

* :mod:`.memory`   RSS / heap / CUDA memory probes and the per-step recorder;
* :mod:`.flops`    the matmul-rate probe, FLOPs per row and the model's shape;
* :mod:`.workers`  the worker processes that train TRL's and our trainer;
* :mod:`.inputs`   the shared inputs (model folder, tokenized rows) built by the ``prepare`` worker;
* :mod:`.report`   per-run figures, the summary over reps and the printed table.

The package is imported only by the benchmark scripts (``benchmarks/`` on ``sys.path``); its modules
import the standard library at module level and torch / transformers / TRL inside functions, so the
parent process stays small.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent  # the repository
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "preference" / "ultrafeedback_binarized_sample_train.jsonl"

#: the benchmark model (issue reference configuration)
MODEL_SHAPE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                   intermediate_size=768, max_position_embeddings=1024, tokenizer="gpt2")

#: TRL figures measured earlier on this machine class (issue reference)
TRL_REFERENCE = {"s_per_step": 4.5, "tokens_per_s": 285.0, "peak_rss_gib": 3.5}
#: targets for ours relative to TRL
TARGETS = {"throughput_ratio_min": 2.0, "rss_ratio_max": 0.35}

VARIANTS = ("trl", "ours", "ours-unfused", "ours-shared", "ours-fp32")

"""Preference data: load -> normalize -> binarize -> clean -> split -> Parquet.

Submodules:

* :mod:`orpo_core.data.errors`   ``DataError`` (names file, row/line and field), ``RowRef``.
* :mod:`orpo_core.data.schema`   the normalized schema (pyarrow), message validation, Parquet I/O.
* :mod:`orpo_core.data.loading`  Hub datasets, local JSON/JSONL(.gz)/CSV/Parquet files and folders, synthetic.
* :mod:`orpo_core.data.formats`  format detection and per-row normalization
  (standard, conversational, hh, sharegpt, ratings).
* :mod:`orpo_core.data.binarize` rated completions -> (chosen, rejected) pairs.
* :mod:`orpo_core.data.chunked`  chunked normalization and cleaning, in ``data.num_proc`` processes.
* :mod:`orpo_core.data.prepare`  ``prepare_dataset(recipe, out_dir)``: the whole stage.
* :mod:`orpo_core.data.tokenize` (tokenization stage, separate owner).

Attributes are imported lazily so ``import orpo_core.data.tokenize`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DataError", "RowRef", "prepare_dataset", "read_pairs", "PAIR_SCHEMA"]

_LAZY = {
    "DataError": "orpo_core.data.errors",
    "RowRef": "orpo_core.data.errors",
    "prepare_dataset": "orpo_core.data.prepare",
    "read_pairs": "orpo_core.data.schema",
    "PAIR_SCHEMA": "orpo_core.data.schema",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'orpo_core.data' has no attribute {name!r}")

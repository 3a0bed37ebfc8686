"""The recipe the end-to-end tests share: the random-init ``tiny`` model (1 layer, hidden 32) on
synthetic pairs, float32; each test adds or replaces whole sections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

TINY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
              "num_key_value_heads": 2}


def tiny_recipe(run_name: str, output_dir: str | Path, *, seed: int = 7, n_rows: int = 160, tiny: dict | None = None,
                **sections: Any) -> dict[str, Any]:
    """A recipe dict: ``run_name``, ``output_dir``, ``seed``, the tiny model (``tiny`` entries
    override :data:`TINY_MODEL`), ``n_rows`` synthetic pairs (20 % test, max_length 64, prompts
    up to 48 tokens); ``sections`` (e.g. ``train={...}``) replace or add top-level sections."""
    d: dict[str, Any] = {
        "run_name": run_name, "output_dir": str(output_dir), "seed": seed,
        "model": {"name_or_path": "tiny", "dtype": "float32", "tiny": {**TINY_MODEL, **(tiny or {})}},
        "data": {"sources": [{"synthetic": {"n_rows": n_rows}}], "test_size": 0.2, "max_length": 64, "max_prompt_length": 48},
    }
    d.update(sections)
    return d


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    """Write ``recipe`` as YAML to ``path`` and return the path."""
    path.write_text(yaml.safe_dump(recipe))
    return path

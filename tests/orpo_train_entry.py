"""Helpers for the trainer tests, and a subprocess entry point for training.

Imported by tests/test_trainer.py, test_modeling.py, test_resume.py and
test_accelerate.py (pytest puts tests/ on sys.path). Run as a script
(``python tests/orpo_train_entry.py`` or under ``accelerate launch``) it trains
with :func:`orpo_core.training.run.run_training`:

    --recipe FILE      recipe as JSON (recipe_from_dict input)
    --tokenized DIR    tokenize stage output
    --out DIR          training stage folder
    --no-resume        start over even if checkpoints exist
    --step-sleep S     sleep S seconds after each optimizer step (lets a test kill the run
                       between checkpoints; does not change the result)
    --report PREFIX    each process writes PREFIX.rank<k>.json with a checksum of its
                       final trainable weights and its last logged loss
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tokenizer": "char",
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def recipe_dict(run_dir: str | Path, n_rows: int = 48, **sections: Any) -> dict:
    """A tiny recipe (hidden 32, 2 layers, byte tokenizer, synthetic arithmetic pairs)
    writing under ``run_dir``; ``sections`` are deep-merged over the defaults."""
    base = {
        "run_name": "t",
        "output_dir": str(run_dir),
        "seed": 7,
        "model": {"name_or_path": "tiny", "dtype": "float32", "tiny": dict(TINY)},
        "data": {
            "sources": [{"synthetic": {"task": "arithmetic", "n_rows": n_rows}}],
            "test_size": 0.2,
            "max_length": 64,
            "max_prompt_length": 40,
        },
        "orpo": {"beta": 0.1, "alpha": 1.0},
        "train": {
            "learning_rate": 3e-3,
            "per_device_train_batch_size": 4,
            "per_device_eval_batch_size": 8,
            "max_steps": 6,
            "logging_steps": 2,
            "save_steps": None,
            "group_by_length": True,
            "report_to": [],
        },
        "eval": {"bootstrap_samples": 0},
    }
    return _merge(base, sections)


def make_recipe(run_dir: str | Path, n_rows: int = 48, **sections: Any):
    from orpo_core.config import recipe_from_dict

    return recipe_from_dict(recipe_dict(run_dir, n_rows=n_rows, **sections))


def build_tokenized(recipe, where: str | Path | None = None) -> Path:
    """Run the real prepare + tokenize stages for ``recipe`` (under ``recipe.out_dir``
    unless ``where``) and return the tokenized folder."""
    from orpo_core.data.prepare import prepare_dataset
    from orpo_core.data.tokenize import tokenize_dataset

    root = Path(where) if where is not None else recipe.out_dir
    prepare_dataset(recipe, root / "data")
    tokenize_dataset(recipe, root / "data", root / "tokenized")
    return root / "tokenized"


def hand_tokenized(tokenizer, n_rows: int = 16, seed: int = 0):
    """Synthetic pairs tokenized by hand with the chat template (contract 2 layout, no
    tokenize stage): prompt = rendered prompt with generation prompt, completions = the
    rest of the rendered conversation. Adds ``row_index``."""
    import datasets

    from orpo_core.data.synthetic.arithmetic import generate_arithmetic

    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    rows = []
    for i, r in enumerate(generate_arithmetic(n_rows, seed=seed)):
        p = tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
        c = tokenizer.apply_chat_template(r["prompt"] + r["chosen"], tokenize=False)
        j = tokenizer.apply_chat_template(r["prompt"] + r["rejected"], tokenize=False)
        assert c.startswith(p) and j.startswith(p)
        rows.append(
            {
                "prompt_input_ids": enc(p),
                "chosen_input_ids": enc(c[len(p):]),
                "rejected_input_ids": enc(j[len(p):]),
                "source": r["source"],
                "row_index": i,
            }
        )
    return datasets.Dataset.from_list(rows)


def weights_checksum(model) -> str:
    """sha256 of every trainable parameter's bytes (name order)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_safetensors_dir(folder: str | Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--tokenized", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument("--step-sleep", type=float, default=0.0)
    ap.add_argument("--report", default=None)
    a = ap.parse_args(argv)

    from transformers import TrainerCallback

    from orpo_core.config import recipe_from_dict
    from orpo_core.training.run import run_training

    recipe = recipe_from_dict(json.loads(Path(a.recipe).read_text()))
    state: dict[str, Any] = {}

    class Probe(TrainerCallback):
        def on_step_end(self, args, st, control, model=None, **kw):
            if a.step_sleep:
                time.sleep(a.step_sleep)

        def on_train_end(self, args, st, control, model=None, **kw):
            state["model"] = model
            state["losses"] = [r["loss"] for r in st.log_history if "loss" in r]

    result = run_training(recipe, a.tokenized, a.out, resume=not a.no_resume, callbacks=[Probe()])
    if a.report:
        rank = int(os.environ.get("RANK", "0"))
        model = state["model"]
        model = getattr(model, "module", model)
        report = {
            "rank": rank,
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "checksum": weights_checksum(model),
            "losses": state["losses"],
            "global_step": result["global_step"],
        }
        Path(f"{a.report}.rank{rank}.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

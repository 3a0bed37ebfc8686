"""`orpo eval RECIPE --model PATH` on a run that was never prepared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app


def _recipe(tmp_path: Path, corpus: Path) -> Path:
    d = {
        "run_name": "unprepared",
        "output_dir": str(tmp_path / "run"),
        "seed": 7,
        "model": {"name_or_path": "tiny", "dtype": "float32"},
        "data": {"sources": [{"synthetic": {"n_rows": 40}}], "max_length": 64, "max_prompt_length": 32},
        "eval": {
            "bootstrap_samples": 20,
            "max_new_tokens": 4,
            "prompts": ["What is 2 + 3?"],
            "corpus": str(corpus),
            "corpus_max_tokens": 200,
            "stride": 32,
        },
    }
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


@pytest.fixture()
def corpus(tmp_path) -> Path:
    c = tmp_path / "corpus.txt"
    c.write_text("Plain text for a perplexity check, nothing prepared.\n" * 20)
    return c


def test_eval_model_alone_without_prepared_run(tmp_path, tiny_model_dir, corpus):
    recipe = _recipe(tmp_path, corpus)
    run = tmp_path / "run"
    r = CliRunner().invoke(app, ["eval", str(recipe), "--model", str(tiny_model_dir), "--no-base"])
    assert r.exit_code == 0, r.output
    assert not (run / "tokenized").exists() and not (run / "base_model").exists()  # nothing prepared or built
    ev = json.loads((run / "eval" / "eval.json").read_text())
    assert set(ev["results"]) == {"trained"} and ev["labels"] == {"trained": "model"}
    # what needs no prepared data ran: corpus perplexity with the model's own tokenizer, fixed prompts
    assert ev["metrics"]["trained"]["perplexity/corpus"]["n"] == 199
    assert not any(k.startswith("preference/") for k in ev["results"]["trained"])
    assert ev["settings"]["prepared"] is False
    assert Path(ev["settings"]["tokenizer_dir"]) == tiny_model_dir.resolve()
    assert [g["prompt"] for g in ev["generations"]] == ["What is 2 + 3?"] and "trained" in ev["generations"][0]
    # what it skipped, in eval.json, eval.md and the CLI output
    assert any("held-out preference" in s for s in ev["skipped"])
    assert any("lm-eval tasks" in s for s in ev["skipped"])
    assert "skipped" in r.output and "held-out preference" in r.output
    md = (run / "eval" / "eval.md").read_text()
    assert "## Skipped" in md and "orpo prep RECIPE" in md
    assert "| model |" in md  # called by what it is, in the Models table
    assert "| metric | model |" in md and "| prompt | model |" in md
    assert "trained" not in md.split("## Skipped")[0]


def test_eval_model_against_base_without_prepared_run(tmp_path, tiny_model_dir, corpus):
    recipe = _recipe(tmp_path, corpus)
    run = tmp_path / "run"
    r = CliRunner().invoke(app, ["eval", str(recipe), "--model", str(tiny_model_dir)])
    assert r.exit_code == 0, r.output
    ev = json.loads((run / "eval" / "eval.json").read_text())
    # the recipe's base (tiny, seed 7) was built and compared; both scored with the model's tokenizer
    assert set(ev["results"]) == {"trained", "base"} and ev["labels"] == {}
    assert ev["deltas"]["perplexity/corpus"] == pytest.approx(
        ev["results"]["trained"]["perplexity/corpus"] - ev["results"]["base"]["perplexity/corpus"]
    )
    assert ev["deltas"]["perplexity/corpus"] != 0


def test_eval_without_model_still_needs_a_prepared_run(tmp_path, corpus):
    r = CliRunner().invoke(app, ["eval", str(_recipe(tmp_path, corpus))])
    assert r.exit_code == 2
    assert "no trained model" in r.output and "--model PATH" in r.output
    assert not (tmp_path / "run").exists()  # nothing built or written


def test_eval_out_writes_beside_the_pipelines_eval_and_refuses_paths(tmp_path, tiny_model_dir, corpus):
    recipe = _recipe(tmp_path, corpus)
    run = tmp_path / "run"
    r = CliRunner().invoke(app, ["eval", str(recipe), "--model", str(tiny_model_dir), "--no-base", "--out", "eval-benchmarks"])
    assert r.exit_code == 0, r.output
    assert (run / "eval-benchmarks" / "eval.json").is_file() and not (run / "eval").exists()
    for bad in ("../elsewhere", "train", "a/b"):
        r = CliRunner().invoke(app, ["eval", str(recipe), "--model", str(tiny_model_dir), "--out", bad])
        assert r.exit_code == 2 and "--out" in r.output, (bad, r.output)
    assert not (tmp_path / "elsewhere").exists()

"""End to end with the real stages (no stand-ins): the Prefect pipeline on a tiny recipe, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app, parse_grid
from tiny_recipe import tiny_recipe, write_recipe


def _recipe(tmp_path: Path, **over) -> Path:
    d = tiny_recipe(
        "e2e", tmp_path / "run", orpo={"beta": 0.1},
        train={"learning_rate": 1e-3, "max_steps": 4, "per_device_train_batch_size": 8, "logging_steps": 2},
        eval={"bootstrap_samples": 50, "max_new_tokens": 4, "n_prompts": 1}, hub={"repo_id": "someone/e2e-tiny"},
    )
    for k, v in over.items():
        d[k] = {**d.get(k, {}), **v}
    return write_recipe(tmp_path / "recipe.yaml", d)


@pytest.mark.slow
def test_pipeline_runs_end_to_end_then_caches(tmp_path, prefect_harness):
    from flows.pipeline import orpo_pipeline

    recipe = _recipe(tmp_path)
    out = tmp_path / "run"
    first = orpo_pipeline(str(recipe))
    assert {first["stages"][s] for s in ("prepare", "tokenize", "train", "evaluate")} == {"Completed"}
    for f in [
        "data/train.parquet",
        "data/stats.json",
        "tokenized/train.parquet",
        "tokenized/tokenizer/tokenizer.json",
        "train/model/model.safetensors",
        "train/metrics.json",
        "eval/eval.json",
        "eval/eval.md",
        "hub/README.md",
        "hub/model.safetensors",
    ]:
        assert (out / f).is_file(), f
    ev = json.loads((out / "eval" / "eval.json").read_text())
    for role in ("trained", "base"):
        assert 0.0 <= ev["results"][role]["preference/accuracy"] <= 1.0
    card = (out / "hub" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert "orpo" in meta["tags"]
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics["preference/accuracy"] == pytest.approx(ev["results"]["trained"]["preference/accuracy"], abs=1e-6)

    again = orpo_pipeline(str(recipe))
    assert [again["stages"][s] for s in ("prepare", "tokenize", "train", "evaluate")] == ["Cached"] * 4

    beta = orpo_pipeline(str(recipe), overrides=["orpo.beta=0.2"])
    assert [beta["stages"][s] for s in ("prepare", "tokenize", "train", "evaluate")] == [
        "Cached",
        "Cached",
        "Completed",
        "Completed",
    ]


@pytest.mark.slow
def test_cli_stage_commands(tmp_path):
    recipe = _recipe(tmp_path)
    runner = CliRunner()
    out = tmp_path / "run"
    r = runner.invoke(app, ["prep", str(recipe)])
    assert r.exit_code == 0, r.output
    assert (out / "tokenized" / "train.parquet").is_file()
    r = runner.invoke(app, ["train", str(recipe), "--set", "train.max_steps=2"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "train" / "metrics.json").read_text())["global_step"] == 2
    r = runner.invoke(app, ["eval", str(recipe), "--no-base"])
    assert r.exit_code == 0, r.output
    ev = json.loads((out / "eval" / "eval.json").read_text())
    assert "trained" in ev["results"] and "base" not in ev["results"]


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p2", "chosen": "a"\n')
    recipe = _recipe(tmp_path, data={"sources": [{"path": str(bad), "format": "standard"}]})
    r = CliRunner().invoke(app, ["prep", str(recipe)])
    assert r.exit_code == 2
    assert "bad.jsonl" in r.output and "line 2" in r.output
    assert not (tmp_path / "run" / "data" / "train.parquet").exists()

    r = CliRunner().invoke(app, ["validate", str(recipe), "--set", "orpo.beta=-1"])
    assert r.exit_code == 2 and "orpo.beta" in r.output


def test_parse_grid():
    assert parse_grid(["orpo.beta=0.05,0.1", "orpo.alpha=1"]) == {"orpo.beta": [0.05, 0.1], "orpo.alpha": [1]}
    import typer

    with pytest.raises(typer.BadParameter):
        parse_grid(["orpo.beta"])

"""Recipe validation and output safety (issue 22, items 4-7): safe run names, resolved output
folder, finite floats, max_length vs the model's context, no token in overrides, offline push
refused before any upload, eval report published together with normal file modes."""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from orpo_core.config import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def _cli(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    e.update(PYTHONPATH=str(ROOT), NO_COLOR="1", COLUMNS="300", **(env or {}))
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", ["../../escaped", "a/b", "..", ".hidden", "x\\y", "", "a" * 129, "run..name"])
def test_unsafe_run_names_are_refused(name):
    with pytest.raises(RecipeError, match="run_name .* is not a safe folder name"):
        load_recipe(QUICKSTART, {"run_name": name})


def test_safe_run_names_and_resolved_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = load_recipe(QUICKSTART, ["run_name=quickstart-a0.5-b0.05", "output_dir=runs/${run_name}"])
    assert r.out_dir == tmp_path / "runs" / "quickstart-a0.5-b0.05" and r.out_dir.is_absolute()
    assert load_recipe(QUICKSTART, ["output_dir=~/x"]).out_dir == Path.home() / "x"


@pytest.mark.parametrize("key", ["train.learning_rate", "orpo.beta", "orpo.alpha", "data.test_size", "train.max_grad_norm",
                                 "train.num_train_epochs", "peft.lora_dropout"])
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_floats_are_refused_everywhere(key, value):
    with pytest.raises(RecipeError, match=rf"{key}: Input should be a finite number"):
        load_recipe(QUICKSTART, [f"{key}={value}"])


def test_every_float_field_of_every_section_rejects_inf():
    """allow_inf_nan=False on the shared base class: no recipe section accepts a non-finite float."""
    import typing

    from pydantic import BaseModel

    import orpo_core.config as cfg

    sections = [c for c in vars(cfg).values() if isinstance(c, type) and issubclass(c, cfg._Strict) and c is not cfg._Strict]
    checked = 0
    for cls in sections:
        for name, field in cls.model_fields.items():
            if float in (typing.get_args(field.annotation) or (field.annotation,)):
                assert cls.model_config.get("allow_inf_nan") is False, cls
                with pytest.raises(Exception, match="finite number"):
                    cls.__pydantic_validator__.validate_assignment(cls.model_construct(), name, math.inf)
                checked += 1
    assert checked >= 10 and all(issubclass(c, BaseModel) for c in sections)


@pytest.mark.parametrize(
    "override",
    ["hub.token=abc123", "hub.hf_token=abc", "hub.repo_id=hf_" + "A1b2" * 9, "hub.commit_message=use hf_" + "x" * 34],
)
def test_token_overrides_are_refused_without_echoing_them(override):
    with pytest.raises(RecipeError, match="HF_TOKEN") as ei:
        load_recipe(QUICKSTART, [override])
    assert override.split("=", 1)[1] not in str(ei.value)


def test_cli_refuses_token_override_before_prefect(tmp_path):
    token = "hf_" + "Q" * 36
    res = _cli("run", str(QUICKSTART), "--set", f"hub.commit_message={token}", "--set", f"output_dir={tmp_path / 'run'}")
    assert res.returncode == 2 and "HF_TOKEN" in res.stderr and token not in res.stderr + res.stdout
    assert not (tmp_path / "run").exists()


def test_cli_refuses_token_in_a_sweep_grid(tmp_path):
    token = "hf_" + "G" * 40
    res = _cli("sweep", str(QUICKSTART), "--grid", f"hub.commit_message=a,{token}", "--set", f"output_dir={tmp_path / 'run'}")
    assert res.returncode == 2 and "HF_TOKEN" in res.stderr and token not in res.stderr + res.stdout


def test_max_length_above_the_model_context_fails_before_tokenization(tmp_path):
    """data.max_length=1.0e+11 on a tiny model with 256 positions: `orpo prep` exits 2 naming both
    numbers and writes nothing (checked before the data stage)."""
    res = _cli("prep", str(QUICKSTART), "--set", f"output_dir={tmp_path / 'run'}", "--set", "data.max_length=1.0e+11",
               "--set", "data.sources.0.synthetic.n_rows=50")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "data.max_length (100000000000) exceeds the model's context length (256" in res.stderr
    assert not (tmp_path / "run" / "tokenized").exists() and not (tmp_path / "run" / "data").exists()


def test_offline_push_is_refused_in_one_line_before_any_upload(tmp_path):
    res = _cli("push", str(QUICKSTART), "--no-dry-run", "--set", f"output_dir={tmp_path / 'run'}", env={"HF_HUB_OFFLINE": "1"})
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if "error" in line.lower()]
    assert errors == [errors[0]] and "HF_HUB_OFFLINE=1" in errors[0] and "--dry-run" in errors[0], res.stderr[-2000:]
    assert not (tmp_path / "run" / "hub").exists()


def test_eval_report_is_published_as_one_folder_with_normal_modes(tmp_path):
    """write_report: the previous eval.md / eval.json / curves.png are replaced together; files
    0644 and the folder 0755 under umask 022 (not mkstemp's 0600 / mkdtemp's 0700)."""
    from orpo_core.evaluation.report import write_report

    old_umask = os.umask(0o022)
    try:
        out = tmp_path / "eval"
        history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "eval_loss": 1.7}]
        base = {"run_name": "t", "metrics": {}, "settings": {}, "models": {}}
        write_report(json.loads(json.dumps({**base, "run": "first"})), out, history)
        first_md = (out / "eval.md").read_text()
        write_report(json.loads(json.dumps({**base, "run": "second"})), out, [])
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "eval.md"]  # the old curves.png went with its report
    assert json.loads((out / "eval.json").read_text())["run"] == "second"
    assert "curves.png" in first_md and "curves.png" not in (out / "eval.md").read_text()  # md and png of one report
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

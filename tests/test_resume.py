"""Checkpoints and resume: a training process killed with SIGKILL after a checkpoint and
resumed ends with the same weights (and log history) as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from orpo_train_entry import build_tokenized, load_safetensors_dir, recipe_dict

ENTRY = Path(__file__).resolve().parent / "orpo_train_entry.py"

# 24 train pairs, batch 2 x accumulation 2: 6 optimizer steps per epoch; 9 steps cross an
# epoch boundary; checkpoints every 2 steps; an evaluation every 3 steps in between.
TRAIN = {
    "max_steps": 9,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "save_steps": 2,
    "save_total_limit": 2,
    "eval_steps": 3,
    "logging_steps": 1,
    "learning_rate": 3e-3,
    "warmup_steps": 2,
    "group_by_length": True,
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from orpo_core.config import recipe_from_dict

    root = tmp_path_factory.mktemp("resume")
    prep = recipe_from_dict(recipe_dict(root / "prep", n_rows=32, train=TRAIN))
    tokenized = build_tokenized(prep)
    return root, tokenized


def _recipe(root: Path, name: str, **train):
    from orpo_core.config import recipe_from_dict

    d = recipe_dict(root / name, n_rows=32, train={**TRAIN, **train})
    return d, recipe_from_dict(d)


def test_killed_run_resumes_to_identical_weights(setup):
    from orpo_core.training.run import run_training

    root, tokenized = setup
    _, ref = _recipe(root, "ref")
    ref_result = run_training(ref, tokenized, ref.out_dir / "train")
    assert ref_result["global_step"] == 9 and ref_result["resumed_from"] is None

    d, rec = _recipe(root, "killed")
    rec_file = root / "killed.json"
    rec_file.write_text(json.dumps(d))
    out = rec.out_dir / "train"
    ckpt4 = out / "checkpoints" / "checkpoint-4"
    proc = subprocess.Popen(
        [sys.executable, str(ENTRY), "--recipe", str(rec_file), "--tokenized", str(tokenized), "--out", str(out),
         "--step-sleep", "0.4"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    try:
        deadline = time.time() + 120
        while not (ckpt4 / "trainer_state.json").is_file():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "checkpoint-4 never appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model").exists() and not (out / "metrics.json").exists()

    result = run_training(rec, tokenized, out, resume=True)
    resumed = result["resumed_from"]
    assert resumed is not None and int(Path(resumed).name.split("-")[1]) in (4, 6, 8)
    assert result["global_step"] == 9

    a = load_safetensors_dir(ref.out_dir / "train" / "model")
    b = load_safetensors_dir(out / "model")
    assert a.keys() == b.keys() and a
    base = load_safetensors_dir(ref.out_dir / "base_model")
    moved = max(float((a[k].float() - base[k].float()).abs().max()) for k in a if k in base)
    assert moved > 1e-3  # training changed the weights, so equality below is meaningful
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)

    # the restored Trainer state carries the whole log history, with the same losses
    h_ref = json.loads((ref.out_dir / "train" / "log_history.json").read_text())
    h_res = json.loads((out / "log_history.json").read_text())
    loss_ref = {r["step"]: r["loss"] for r in h_ref if "loss" in r}
    loss_res = {r["step"]: r["loss"] for r in h_res if "loss" in r}
    assert sorted(loss_ref) == sorted(loss_res) == list(range(1, 10))
    for step in loss_ref:
        assert loss_res[step] == pytest.approx(loss_ref[step], rel=1e-5, abs=1e-6)
    assert json.loads((out / "metrics.json").read_text())["resumed_from"] == resumed


def test_resume_from_the_final_checkpoint_trains_no_extra_step(setup):
    """A process that died after its last checkpoint (checkpoint-N, N == max_steps) but
    before writing the model: the retry restores that checkpoint and trains nothing more
    (transformers alone would run step N+1)."""
    import shutil

    from orpo_core.training.run import run_training

    root, tokenized = setup
    _, rec = _recipe(root, "final", max_steps=4, eval_steps=None)
    out = rec.out_dir / "train"
    first = run_training(rec, tokenized, out)
    assert first["global_step"] == 4 and (out / "checkpoints" / "checkpoint-4" / "trainer_state.json").is_file()
    done = load_safetensors_dir(out / "model")
    base = load_safetensors_dir(rec.out_dir / "base_model")
    assert max(float((done[k] - base[k]).abs().max()) for k in done if k in base) > 1e-3
    history = json.loads((out / "log_history.json").read_text())
    shutil.rmtree(out / "model")
    (out / "metrics.json").unlink()

    result = run_training(rec, tokenized, out, resume=True)
    assert Path(result["resumed_from"]).name == "checkpoint-4"
    assert result["global_step"] == 4
    again = load_safetensors_dir(out / "model")
    for k in done:
        torch.testing.assert_close(again[k], done[k], rtol=0, atol=0, msg=k)
    steps = [r["step"] for r in json.loads((out / "log_history.json").read_text()) if "loss" in r]
    assert steps == [r["step"] for r in history if "loss" in r] == [1, 2, 3, 4]


def test_resume_refuses_checkpoints_of_other_settings_and_no_resume_starts_over(setup):
    from orpo_core.training.run import TrainInputError, latest_checkpoint, run_training

    root, tokenized = setup
    _, first = _recipe(root, "sig", max_steps=2, eval_steps=None)
    run_training(first, tokenized, first.out_dir / "train")
    assert latest_checkpoint(first.out_dir / "train" / "checkpoints").endswith("checkpoint-2")

    _, changed = _recipe(root, "sig", max_steps=2, eval_steps=None, learning_rate=1e-2)
    with pytest.raises(TrainInputError, match="other settings"):
        run_training(changed, tokenized, changed.out_dir / "train", resume=True)

    result = run_training(changed, tokenized, changed.out_dir / "train", resume=False)
    assert result["resumed_from"] is None and result["global_step"] == 2


def test_latest_checkpoint_skips_incomplete(tmp_path):
    from orpo_core.training.run import latest_checkpoint

    d = tmp_path / "checkpoints"
    for step, complete in ((2, True), (4, True), (6, False)):
        c = d / f"checkpoint-{step}"
        c.mkdir(parents=True)
        for f in ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"]:
            (c / f).write_bytes(b"x")
        if complete:
            (c / "trainer_state.json").write_text("{}")
    (d / "checkpoint-10").mkdir()  # killed while writing weights
    assert latest_checkpoint(d) == str(d / "checkpoint-4")
    assert latest_checkpoint(d, remove_incomplete=True) == str(d / "checkpoint-4")
    assert not (d / "checkpoint-6").exists() and not (d / "checkpoint-10").exists()
    assert latest_checkpoint(tmp_path / "absent") is None


def test_cli_train_takes_the_train_task_resume_decision(setup, tmp_path):
    """`orpo train` decides like the train task (orpo_core.runs.resume): the same configuration
    resumes from its final checkpoint without an extra step; another configuration's checkpoints
    are removed and training starts over (before, the CLI refused them with TrainInputError)."""
    import shutil

    import yaml
    from typer.testing import CliRunner

    from flows.cli import app

    root, tokenized = setup
    d, first = _recipe(root, "cli", max_steps=2, eval_steps=None)
    run = first.out_dir
    shutil.copytree(tokenized, run / "tokenized")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(d))

    def train(*extra: str) -> dict:
        res = CliRunner().invoke(app, ["train", str(path), *extra])
        assert res.exit_code == 0, res.output
        return json.loads((run / "train" / "metrics.json").read_text())

    m1 = train()
    assert m1["resumed_from"] is None and m1["global_step"] == 2
    m2 = train()  # same configuration: the final checkpoint is this run's own
    assert Path(m2["resumed_from"]).name == "checkpoint-2" and m2["global_step"] == 2
    m3 = train("--set", "train.learning_rate=0.01")  # another configuration: old checkpoints go
    assert m3["resumed_from"] is None and m3["global_step"] == 2
    marker = json.loads((run / "train" / ".stage-inprogress.json").read_text())
    assert marker["finished"] is True and "pid" not in marker

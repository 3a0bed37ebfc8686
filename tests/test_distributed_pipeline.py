"""``train.distributed`` through the pipeline: 2 gloo processes (DDP on CPU) under Prefect.

The smoke recipe (tiny model, 4 steps) runs through ``orpo_pipeline`` (what ``orpo run``
calls) with ``train.distributed.num_processes: 2`` and per-device batch 2. Both ranks'
lines reach the flow run's logs, one model is saved, and the loss curve equals a
1-process run with batch 4 on the same tokenized data (the loss is normalised over the
whole step across processes). A launch interrupted after a checkpoint resumes from it, as
a retried task does.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from orpo_train_entry import load_safetensors_dir
from tiny_recipe import tiny_recipe

TRAIN = {
    "learning_rate": 1e-3,
    "max_steps": 4,
    "per_device_train_batch_size": 2,
    "logging_steps": 1,
    "save_steps": 2,
    "group_by_length": True,
}


def _smoke(run_dir: Path, distributed: dict | None = None, **train) -> dict:
    d = tiny_recipe(
        "smoke-ddp", run_dir, n_rows=80, orpo={"beta": 0.1}, train={**TRAIN, **train},
        eval={"bootstrap_samples": 20, "max_new_tokens": 4, "n_prompts": 1, "compare_base": False},
        hub={"repo_id": "someone/smoke-ddp"},
    )
    if distributed is not None:
        d["train"]["distributed"] = distributed
    return d


def _losses(train_dir: Path) -> list[float]:
    return [r["loss"] for r in json.loads((train_dir / "log_history.json").read_text()) if "loss" in r]


def _flow_run_logs(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    out: list[str] = []
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200, offset=len(out))
            out += [log.message for log in page]
            if len(page) < 200:
                return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """1 process, batch 4, the same recipe otherwise: tokenized folder, loss curve, weights."""
    from orpo_core.config import recipe_from_dict
    from orpo_core.data.prepare import prepare_dataset
    from orpo_core.data.tokenize import tokenize_dataset
    from orpo_core.training.run import run_training

    root = tmp_path_factory.mktemp("ddp-ref")
    r = recipe_from_dict(_smoke(root / "ref", per_device_train_batch_size=4))
    prepare_dataset(r, root / "ref" / "data")
    tokenize_dataset(r, root / "ref" / "data", root / "ref" / "tokenized")
    run_training(r, root / "ref" / "tokenized", root / "ref" / "train")
    return {"tokenized": root / "ref" / "tokenized", "train": root / "ref" / "train", "losses": _losses(root / "ref" / "train")}


@pytest.mark.slow
def test_pipeline_with_two_gloo_processes_matches_one_process(tmp_path, prefect_harness, reference):
    from flows.pipeline import orpo_pipeline

    out = tmp_path / "run"
    recipe = tmp_path / "smoke.yaml"
    recipe.write_text(yaml.safe_dump(_smoke(out, {"num_processes": 2, "strategy": "ddp"})))
    state = orpo_pipeline(str(recipe), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["stages"]["train"] == "Completed"

    # both ranks' lines in the flow run's logs (train task logs belong to the flow run)
    messages = _flow_run_logs(state.state_details.flow_run_id)
    for rank in (0, 1):
        steps = [m for m in messages if m.startswith(f"rank {rank} | ") and "orpo_core.training.launch: step 4/4" in m]
        assert steps, f"no step line of rank {rank} in the run log"
    assert any(m.startswith("launching ddp training: 2 process(es)") for m in messages)
    # rank 0's Trainer events reach the task's progress callback: its log lines and the progress artifact
    assert any(m.startswith("step 4/4 ") and '"loss"' in m for m in messages)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["smoke-ddp-training-progress"])))
    assert arts and arts[0].data == 100.0

    # one model, written once and completely
    train = out / "train"
    assert sorted(p.name for p in (train / "model").iterdir() if p.suffix == ".safetensors") == ["model.safetensors"]
    assert not [p for p in train.rglob("*") if ".tmp" in p.name]
    assert not (train / "launch" / "errors").exists() or not any((train / "launch" / "errors").iterdir())
    metrics = json.loads((train / "metrics.json").read_text())
    assert metrics["global_step"] == 4 and metrics["distributed"]["strategy"] == "ddp"
    assert result["train_metrics"]["distributed"] == {"strategy": "ddp", "num_processes": 2, "num_machines": 1}

    # same loss curve as the 1-process run (and the weights move the same way)
    losses = _losses(train)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses == pytest.approx(reference["losses"], rel=1e-5)
    a = load_safetensors_dir(reference["train"] / "model")
    b = load_safetensors_dir(train / "model")
    import torch

    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-6, msg=k)

    # the model card records the strategy (the embedded recipe's train.distributed)
    card = (out / "hub" / "README.md").read_text()
    recipe_block = yaml.safe_load(card.split("```yaml")[-1].split("```")[0])
    assert recipe_block["train"]["distributed"]["strategy"] == "ddp"
    assert recipe_block["train"]["distributed"]["num_processes"] == 2


def test_train_cache_key_records_the_strategy(tmp_path):
    from orpo_core.runs.cache import stage_base_key

    def key(dist):
        d = _smoke(tmp_path / "run", dist)
        d["train"].setdefault("distributed", {})
        from orpo_core.config import recipe_from_dict

        full = recipe_from_dict(d).to_dict()
        return stage_base_key("train", {"recipe": full, "tokenized_dir": str(tmp_path / "tok"), "out_dir": str(tmp_path / "run" / "train")})

    one = key(None)
    ddp = key({"num_processes": 2})
    fsdp = key({"num_processes": 2, "strategy": "fsdp"})
    zero3 = key({"num_processes": 2, "strategy": "deepspeed", "deepspeed": {"zero_stage": 3}})
    assert len({one, ddp, fsdp, zero3}) == 4
    assert key({"num_processes": 2}) == ddp


class _Interrupt(Exception):
    pass


@pytest.mark.slow
def test_interrupted_launch_resumes_from_latest_checkpoint(tmp_path, reference):
    """As a retried train task: the first launch dies after a checkpoint (its process group is
    killed), the second one (resume=True) continues from it and ends on the same curve."""
    from orpo_core.config import recipe_from_dict
    from orpo_core.training.launch import train_distributed

    r = recipe_from_dict(_smoke(tmp_path / "run", {"num_processes": 2}))
    out = tmp_path / "run" / "train"

    def stop_after_step_3(level, msg):
        if msg.startswith("rank 0 | ") and "orpo_core.training.launch: step 3/4" in msg:
            raise _Interrupt(msg)

    with pytest.raises(_Interrupt):
        train_distributed(r, reference["tokenized"], out, resume=True, line_logger=stop_after_step_3, gpus=0)
    assert (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()
    if (out / "model").exists():
        # the tiny model's steps take milliseconds: the launch may finish before the kill
        # lands. Then make it the case of a process that died right after its last
        # checkpoint (checkpoint-4), before writing the model: the retry must train no more.
        assert (out / "checkpoints" / "checkpoint-4" / "trainer_state.json").is_file()
        shutil.rmtree(out / "model")
        (out / "metrics.json").unlink(missing_ok=True)

    lines: list[str] = []
    metrics = train_distributed(r, reference["tokenized"], out, resume=True, line_logger=lambda lvl, m: lines.append(m), gpus=0)
    assert metrics["resumed_from"] and Path(metrics["resumed_from"]).name in ("checkpoint-2", "checkpoint-4")
    assert metrics["global_step"] == 4 and metrics["distributed"]["strategy"] == "ddp"
    assert any("resuming from" in m for m in lines)
    assert _losses(out) == pytest.approx(reference["losses"], rel=1e-5)

"""Prefect layer: content cache keys, Cached reruns, retries, the sweep and gated retraining.

The orpo_core stages are replaced by fast deterministic stand-ins (installed in
``sys.modules``) that write real files, so what is tested here is the
orchestration: cache keys, retry semantics, artifacts, folder layout. The code
fingerprint is pinned in the flow tests (other source edits must not turn a
rerun into a miss mid-test); it has its own unit test below.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
import time
import types
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import orpo_core.runs.cache as caching
from orpo_core.runs.cache import (
    dir_fingerprint,
    file_sha256,
    read_stamp,
    source_fingerprint,
    stage_base_key,
    stage_cache_key,
    unpinned_bucket,
    write_stamp,
)


# --------------------------------------------------------------------------- stand-in stages
def acc_formula(alpha: float, beta: float, n_rows: int) -> float:
    """The stand-in 'preference accuracy' of a trained model (independent of the stand-in code)."""
    return round(0.4 + 0.1 * alpha + beta + 0.01 * n_rows, 6)


class Stages:
    def __init__(self) -> None:
        self.calls: dict[str, list[dict]] = defaultdict(list)
        self.fail: dict[str, int] = defaultdict(int)
        self.train_seconds = 0.0  # > 0: trainings overlap visibly when run in parallel
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()

    # prepare: one JSON pair per line in the source file -> train/test files + stats
    def prepare_dataset(self, recipe, out_dir):
        self.calls["prepare"].append({"out": str(out_dir)})
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        lines = Path(recipe.data.sources[0].path).read_text().splitlines()
        (out / "train.jsonl").write_text("\n".join(lines[1:]))
        (out / "test.jsonl").write_text(lines[0])
        stats = {"rows_read": len(lines), "rows_kept": len(lines), "splits": {"train": len(lines) - 1, "test": 1}}
        (out / "stats.json").write_text(json.dumps(stats))
        return stats

    def tokenize_dataset(self, recipe, data_dir, out_dir):
        self.calls["tokenize"].append({"out": str(out_dir), "max_length": recipe.data.max_length})
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        rows = Path(data_dir, "train.jsonl").read_text().splitlines()
        (out / "train.ids").write_text("\n".join(str(len(r)) for r in rows))
        stats = json.loads(Path(data_dir, "stats.json").read_text())
        stats["tokenization"] = {"rows": len(rows), "dropped": {"too_long": 0}}
        stats["tokenizer"] = {"fingerprint": "fake", "vocab_size": 259, "added_tokens": False}
        (out / "stats.json").write_text(json.dumps(stats))
        return stats

    def run_training(self, recipe, tokenized_dir, out_dir, resume=True, callbacks=None):
        out = Path(out_dir)
        ckpt = out / "checkpoints" / "checkpoint-2"
        self.calls["train"].append(
            {"out": str(out), "resume": resume, "beta": recipe.orpo.beta, "alpha": recipe.orpo.alpha, "saw_checkpoint": ckpt.is_dir()}
        )
        logging.getLogger("transformers.trainer").info("***** Running training ***** beta=%s", recipe.orpo.beta)
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "state.json").write_text("{}")
        if self.fail["train"] > 0:
            self.fail["train"] -= 1
            raise ConnectionError("connection reset by peer while streaming a batch")
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        time.sleep(self.train_seconds)
        with self.lock:
            self.active -= 1
        state = SimpleNamespace(global_step=0, max_steps=4)
        for cb in callbacks or []:
            cb.on_train_begin(None, state, None)
        for step in range(1, 5):
            state.global_step = step
            for cb in callbacks or []:
                cb.on_step_end(None, state, None)
                cb.on_log(None, state, None, logs={"loss": 1.0 / step})
        for cb in callbacks or []:
            cb.on_train_end(None, state, None)
        n_rows = len(Path(tokenized_dir, "train.ids").read_text().splitlines())
        model = out / "model"
        model.mkdir(parents=True, exist_ok=True)
        (model / "state.json").write_text(json.dumps({"alpha": recipe.orpo.alpha, "beta": recipe.orpo.beta, "n_rows": n_rows}))
        (model / "config.json").write_text("{}")
        (model / "model.safetensors").write_bytes(hashlib.sha256((model / "state.json").read_bytes()).digest())
        metrics = {"train_loss": 0.25, "eval_loss": 0.5, "train_runtime": 12.345678901}
        (out / "metrics.json").write_text(json.dumps(metrics))
        # the training log depends on train.logging_steps (the model does not): evaluation plots it
        (out / "log_history.json").write_text(json.dumps([{"step": 4, "loss": 0.25, "every": recipe.train.logging_steps}]))
        return metrics

    def run_evaluation(self, recipe, model_dir, tokenized_dir, out_dir, base_model=None, log_history=None):
        self.calls["evaluate"].append({"out": str(out_dir), "base_model": base_model, "compare_base": recipe.eval.compare_base})
        s = json.loads(Path(model_dir, "state.json").read_text())
        acc = acc_formula(s["alpha"], s["beta"], s["n_rows"])
        results = {"trained": {"preference/accuracy": acc, "perplexity/chosen": 10 - acc}}
        if recipe.eval.compare_base:
            results["base"] = {"preference/accuracy": 0.5, "perplexity/chosen": 12.0}
        report = {
            "results": results,
            "metrics": {"trained": {"preference/accuracy": {"value": acc, "n": 20, "ci95": [acc - 0.05, acc + 0.05]}}},
        }
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(report))
        (out / "eval.md").write_text(f"accuracy {acc}")
        return report


@pytest.fixture
def stages(monkeypatch):
    # the real modules the tasks import lazily, imported before their parents are replaced by
    # the fakes below (without this the file passed only after other test files had imported them)
    import orpo_core.training.launch  # noqa: F401
    import orpo_core.evaluation.report  # noqa: F401
    import orpo_core.publish.card  # noqa: F401
    import orpo_core.models.tiny  # noqa: F401

    st = Stages()
    for mod_name, fn in [
        ("orpo_core.data.prepare", "prepare_dataset"),
        ("orpo_core.data.tokenize", "tokenize_dataset"),
        ("orpo_core.training.run", "run_training"),
        ("orpo_core.evaluation", "run_evaluation"),
    ]:
        mod = types.ModuleType(mod_name)
        setattr(mod, fn, getattr(st, fn))
        monkeypatch.setitem(sys.modules, mod_name, mod)
    monkeypatch.setattr(caching, "code_fingerprint", lambda stage: f"pinned-code-{stage}")
    import flows.pipeline
    import flows.retrain
    import flows.sweep

    no_delay = {"retry_delay_seconds": 0, "retry_jitter_factor": None}
    for module in (flows.pipeline, flows.sweep, flows.retrain):
        for name in ("prepare_task", "tokenize_task", "train_task", "evaluate_task", "push_task"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, getattr(module, name).with_options(**no_delay))
    return st


def _write_recipe(tmp_path: Path, n_rows: int = 10, **over) -> Path:
    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        data.write_text("\n".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b"}) for i in range(n_rows)))
    recipe = {
        "run_name": "flowtest",
        "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": "test-org/fake-model"},
        "data": {"sources": [{"path": str(data)}], "max_length": 64, "max_prompt_length": 32},
        "orpo": {"beta": 0.1, "alpha": 1.0},
        "hub": {"repo_id": "tester/orpo-flowtest", "push": False},
    }
    for k, v in over.items():
        recipe[k] = {**recipe.get(k, {}), **v} if isinstance(v, dict) else v
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _task_states(flow_state) -> dict[str, str]:
    """{task name: final state name} of a flow run, read back from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    fid = flow_state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fid])))
    return {tr.name.rsplit("-", 1)[0]: tr.state.name for tr in runs}


def _task_cache_keys(flow_state) -> dict[str, str | None]:
    """{task name: the task run's ``cache_key`` as the server recorded it} of a flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    fid = flow_state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fid])))
    return {tr.name.rsplit("-", 1)[0]: tr.cache_key for tr in runs}


def _run(flow_fn, **params):
    state = flow_fn(**params, return_state=True)
    return state.result(), _task_states(state), state


ALL_CACHED = {"prepare": "Cached", "tokenize": "Cached", "train": "Cached", "evaluate": "Cached"}


# --------------------------------------------------------------------------- pipeline caching
@pytest.mark.prefect
def test_rerun_cached_and_beta_change(prefect_harness, stages, tmp_path):
    from flows.pipeline import orpo_pipeline

    recipe = str(_write_recipe(tmp_path))
    r1, s1, st1 = _run(orpo_pipeline, recipe=recipe)
    assert s1 == {"prepare": "Completed", "tokenize": "Completed", "train": "Completed", "evaluate": "Completed", "push": "Completed"}
    assert r1["metrics"]["preference/accuracy"] == acc_formula(1.0, 0.1, 9)
    assert r1["push"]["dry_run"] is True and Path(r1["paths"]["hub"], "README.md").is_file()

    # same recipe again: every cached stage is Cached, nothing re-ran
    r2, s2, st2 = _run(orpo_pipeline, recipe=recipe)
    assert {k: s2[k] for k in ALL_CACHED} == ALL_CACHED
    assert r2["stages"] == {**ALL_CACHED, "push": "Completed"}
    assert {k: len(v) for k, v in stages.calls.items()} == {"prepare": 1, "tokenize": 1, "train": 1, "evaluate": 1}
    assert r2["metrics"] == r1["metrics"]
    _check_cached_run_summary(tmp_path, st1, st2)
    # the UI's task-run page shows the task run's cache_key: set on every stage, and a Cached
    # stage shows the key of the run that produced it
    k1, k2 = _task_cache_keys(st1), _task_cache_keys(st2)
    for stage in ALL_CACHED:
        assert k1[stage] and k1[stage].startswith(f"{stage}-"), (stage, k1)
        assert k2[stage] == k1[stage], (stage, k1, k2)

    # only orpo.beta changes: train and evaluate rerun, the data stages are cached
    r3, s3, _ = _run(orpo_pipeline, recipe=recipe, overrides=["orpo.beta=0.2"])
    assert (s3["prepare"], s3["tokenize"], s3["train"], s3["evaluate"]) == ("Cached", "Cached", "Completed", "Completed")
    assert stages.calls["train"][-1]["beta"] == 0.2 and len(stages.calls["prepare"]) == 1
    assert r3["metrics"]["preference/accuracy"] == acc_formula(1.0, 0.2, 9)

    # back to beta 0.1: the run folder now holds the beta 0.2 model, so the old cache entry must not be used
    r4, s4, _ = _run(orpo_pipeline, recipe=recipe)
    assert (s4["prepare"], s4["tokenize"], s4["train"], s4["evaluate"]) == ("Cached", "Cached", "Completed", "Completed")
    assert r4["metrics"] == r1["metrics"]
    # a new configuration never resumes from the previous one's checkpoints
    assert [c["resume"] for c in stages.calls["train"]] == [False, False, False]
    assert [c["saw_checkpoint"] for c in stages.calls["train"]] == [False, False, False]


def _check_cached_run_summary(tmp_path, first, second) -> None:
    """The cached re-run ends with its own <run>-summary artifact: every cached stage links to the
    first run's flow run, the results carry intervals; both runs are named and tagged."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    fid1, fid2 = first.state_details.flow_run_id, second.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["flowtest-summary"]), flow_run_id=ArtifactFilterFlowRunId(any_=[fid2]))
        )
        runs = {fid: client.read_flow_run(fid) for fid in (fid1, fid2)}
    assert len(arts) == 1 and arts[0].type == "markdown"
    md = arts[0].data
    name1 = runs[fid1].name
    for stage in ("prepare", "tokenize", "train", "evaluate"):
        assert f"| {stage} | Cached | [{name1}](" in md and f"/runs/flow-run/{fid1})" in md, stage
    assert "| push | Completed | this run |" in md
    assert f"Output folder: `{(tmp_path / 'run').resolve()}`" in md
    # stand-in eval: base 0.5 (no CI), trained 0.69 with CI +-0.05, no paired delta
    assert "| `preference/accuracy` (gate) | 0.5 | 0.69 [0.64, 0.74] | +0.19 | no interval |" in md
    assert "Final training: `train_loss` 0.25, `eval_loss` 0.5" in md
    for fr in runs.values():
        assert fr.name.startswith("flowtest-") and {"recipe=flowtest", "flow=pipeline"} <= set(fr.tags)


@pytest.mark.prefect
def test_deleted_or_changed_outputs_invalidate(prefect_harness, stages, tmp_path):
    import shutil

    from flows.pipeline import orpo_pipeline

    recipe_path = _write_recipe(tmp_path)
    recipe = str(recipe_path)
    _run(orpo_pipeline, recipe=recipe)
    # deleted tokenized folder: tokenize reruns; it produces the same content, so train stays cached
    shutil.rmtree(tmp_path / "run" / "tokenized")
    _, s, _ = _run(orpo_pipeline, recipe=recipe)
    assert (s["prepare"], s["tokenize"], s["train"], s["evaluate"]) == ("Cached", "Completed", "Cached", "Cached")
    # a modified model file: train reruns
    (tmp_path / "run" / "train" / "model" / "config.json").write_text('{"edited": true}')
    _, s, _ = _run(orpo_pipeline, recipe=recipe)
    assert (s["prepare"], s["tokenize"], s["train"]) == ("Cached", "Cached", "Completed")
    # new source rows: everything reruns
    with open(tmp_path / "pairs.jsonl", "a") as f:
        f.write("\n" + json.dumps({"prompt": "q-new", "chosen": "a", "rejected": "b"}))
    r, s, _ = _run(orpo_pipeline, recipe=recipe)
    assert {k: s[k] for k in ALL_CACHED} == {k: "Completed" for k in ALL_CACHED}
    assert r["metrics"]["preference/accuracy"] == acc_formula(1.0, 0.1, 10)
    # a max_length change reruns tokenize (and, its output being identical, nothing after it)
    _, s, _ = _run(orpo_pipeline, recipe=recipe, overrides=["data.max_length=80"])
    assert (s["prepare"], s["tokenize"]) == ("Cached", "Completed")
    assert stages.calls["tokenize"][-1]["max_length"] == 80


@pytest.mark.prefect
def test_each_input_reruns_exactly_the_stages_that_read_it(prefect_harness, stages, tmp_path):
    """Per stage, changing one input it reads reruns that stage and the stages whose inputs change
    as a consequence, and nothing else (stand-in outputs depend only on what they are given)."""
    from flows.pipeline import orpo_pipeline

    tok_dir = tmp_path / "tokenizer"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.json").write_text('{"v": 1}')
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some raw text\n")
    recipe_path = _write_recipe(tmp_path, model={"name_or_path": "test-org/fake-model", "tokenizer": str(tok_dir)}, eval={"corpus": str(corpus)})
    recipe = str(recipe_path)
    overrides: list[str] = []
    _run(orpo_pipeline, recipe=recipe)

    def appended_row():
        with open(tmp_path / "pairs.jsonl", "a") as f:
            f.write("\n" + json.dumps({"prompt": "q-extra", "chosen": "a", "rejected": "b"}))

    R, C = "Completed", "Cached"
    cases = [
        # (what changes, how, expected states of prepare, tokenize, train, evaluate)
        ("prepare: source file content", appended_row, (R, R, R, R)),
        ("prepare: data.test_size", lambda: overrides.append("data.test_size=0.2"), (R, C, C, C)),
        ("tokenize: local tokenizer files", lambda: (tok_dir / "tokenizer.json").write_text('{"v": 2}'), (C, R, R, R)),
        ("prepare+tokenize: data.on_error (both read it)", lambda: overrides.append("data.on_error=skip"), (R, R, C, C)),
        ("train: train.learning_rate", lambda: overrides.append("train.learning_rate=0.001"), (C, C, R, C)),
        ("train+evaluate: train.logging_steps (the plotted log)", lambda: overrides.append("train.logging_steps=3"), (C, C, R, R)),
        ("evaluate: eval.bootstrap_samples", lambda: overrides.append("eval.bootstrap_samples=77"), (C, C, C, R)),
        ("evaluate: eval corpus content", lambda: corpus.write_text("other raw text\n"), (C, C, C, R)),
        ("evaluate: orpo.beta is read by evaluation too", lambda: overrides.append("orpo.beta=0.3"), (C, C, R, R)),
        ("nothing", lambda: None, (C, C, C, C)),
    ]
    for what, change, expected in cases:
        change()
        # the flow's own record of each task's final state (the API's copy arrives asynchronously)
        st = orpo_pipeline(recipe=recipe, overrides=list(overrides))["stages"]
        assert tuple(st[k] for k in ("prepare", "tokenize", "train", "evaluate")) == expected, what


@pytest.mark.prefect
def test_transient_failure_retried_and_ui_artifacts(prefect_harness, stages, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from flows.pipeline import orpo_pipeline

    stages.fail["train"] = 1
    r, s, state = _run(orpo_pipeline, recipe=str(_write_recipe(tmp_path)))
    assert s["train"] == "Completed" and r["metrics"]["preference/accuracy"] == acc_formula(1.0, 0.1, 9)
    # the earlier stages ran once; the retry resumed from the checkpoint written before the failure
    assert len(stages.calls["prepare"]) == 1 and len(stages.calls["tokenize"]) == 1
    assert [(c["resume"], c["saw_checkpoint"]) for c in stages.calls["train"]] == [(False, False), (True, True)]
    fid = state.state_details.flow_run_id
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fid])))
        train_run = next(t for t in runs if t.name.startswith("train"))
        assert train_run.run_count == 2
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[fid])))
        keys = ["flowtest-data-stats", "flowtest-eval-results", "flowtest-training-progress", "flowtest-model-card", "flowtest-train-metrics"]
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    messages = "\n".join(lg.message for lg in logs)
    assert "Retry 1/2" in messages
    assert "[transformers.trainer] ***** Running training ***** beta=0.1" in messages  # transformers logs in the run
    assert '"loss": 0.25' in messages  # Trainer log dicts from the progress callback
    latest = {}
    for a in sorted(arts, key=lambda a: a.created):
        latest[a.key] = a
    assert set(latest) == set(keys)
    assert latest["flowtest-training-progress"].type == "progress" and float(latest["flowtest-training-progress"].data) == 100.0
    assert latest["flowtest-data-stats"].type == "markdown"
    assert "| rows read | added by binarize | kept | dropped |" in latest["flowtest-data-stats"].data
    ev = latest["flowtest-eval-results"]
    assert ev.type == "markdown" and "| metric | base [95 % CI] | trained [95 % CI] | change [95 % CI] | verdict |" in ev.data
    assert f"| `preference/accuracy` (gate) | 0.5 | {acc_formula(1.0, 0.1, 9):g} [" in ev.data
    # the model card reads as markdown: no YAML front matter, metadata as a small table, no broken image
    card = latest["flowtest-model-card"]
    assert card.type == "markdown" and card.data.startswith("# orpo-flowtest\n")
    assert "---\n" not in card.data.split("## ")[0] and "model-index" not in card.data
    assert "| base model | `test-org/fake-model` |" in card.data and "| license | `apache-2.0` |" in card.data
    assert "![" not in card.data
    # tables: floats to 4 significant digits
    train_rows = json.loads(latest["flowtest-train-metrics"].data)
    assert {"metric": "train_runtime", "value": 12.35} in train_rows
    # progress: step / max steps, the latest loss and the ETA in the description
    prog = latest["flowtest-training-progress"].description
    assert "| step | 4 / 4 |" in prog and "| loss | 0.25 |" in prog and "| ETA | done |" in prog


@pytest.mark.prefect
def test_permanent_failure_fails_the_flow(prefect_harness, stages, tmp_path):
    from flows.pipeline import orpo_pipeline
    from orpo_core.config import RecipeError

    with pytest.raises(RecipeError, match="orpo.nonsense"):
        orpo_pipeline(recipe=str(_write_recipe(tmp_path)), overrides=["orpo.nonsense=1"])
    assert not stages.calls
    stages.fail["train"] = 5  # more failures than retries
    with pytest.raises(ConnectionError):
        orpo_pipeline(recipe=str(_write_recipe(tmp_path)))
    assert len(stages.calls["train"]) == 3 and "evaluate" not in stages.calls
    # bad input is not retried: a DataError-like ValueError fails at the first attempt
    from orpo_core.data.errors import DataError

    def bad_data(recipe, out_dir):
        stages.calls["bad"].append(1)
        raise DataError("pairs.jsonl line 3: field 'chosen' is missing")

    sys.modules["orpo_core.data.prepare"].prepare_dataset = bad_data
    with pytest.raises(DataError, match="line 3"):
        orpo_pipeline(recipe=str(_write_recipe(tmp_path)), overrides=["seed=7"])
    assert stages.calls["bad"] == [1]


@pytest.mark.prefect
def test_only_transient_errors_are_retried(prefect_harness, stages, tmp_path):
    """A permission error while writing a checkpoint fails at the first attempt, naming the path;
    a CUDA out-of-memory error is retried (and the retry resumes)."""
    import torch

    from flows.pipeline import orpo_pipeline

    real_train = stages.run_training
    ckpt_file = tmp_path / "run" / "train" / "checkpoints" / "checkpoint-2" / "optimizer.pt"
    errors = [PermissionError(13, "Permission denied", str(ckpt_file))]

    def failing_train(recipe, tokenized_dir, out_dir, resume=True, callbacks=None):
        stages.calls["attempts"].append(1)
        if errors:
            raise errors.pop(0)
        return real_train(recipe, tokenized_dir, out_dir, resume=resume, callbacks=callbacks)

    sys.modules["orpo_core.training.run"].run_training = failing_train
    with pytest.raises(PermissionError) as info:
        orpo_pipeline(recipe=str(_write_recipe(tmp_path)))
    assert len(stages.calls["attempts"]) == 1 and "evaluate" not in stages.calls
    assert str(ckpt_file) in str(info.value) and "\n" not in str(info.value)

    errors.append(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    r, s, _ = _run(orpo_pipeline, recipe=str(_write_recipe(tmp_path)))
    assert s["train"] == "Completed" and len(stages.calls["attempts"]) == 3


def test_is_transient_classifies_errors():
    import httpx
    import torch

    from orpo_core.runs.retry import is_transient

    req = httpx.Request("POST", "https://huggingface.co/api/models")
    transient = [
        ConnectionResetError("reset by peer"),
        TimeoutError("read timed out"),
        httpx.ConnectError("connection refused"),
        httpx.HTTPStatusError("429", request=req, response=httpx.Response(429, request=req)),
        httpx.HTTPStatusError("503", request=req, response=httpx.Response(503, request=req)),
        torch.OutOfMemoryError("CUDA out of memory"),
        RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"),
    ]
    permanent = [
        PermissionError(13, "Permission denied", "/runs/x/train/checkpoints"),
        FileNotFoundError(2, "No such file", "/runs/x/tokenized/train.parquet"),
        ValueError("orpo.beta must be > 0"),
        httpx.HTTPStatusError("403", request=req, response=httpx.Response(403, request=req)),
        OSError(28, "No space left on device"),
        RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
        None,
    ]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in permanent] == [False] * len(permanent)
    # a transient cause inside a wrapper counts; a permanent wrapper does not turn into transient
    try:
        try:
            raise ConnectionResetError("reset")
        except ConnectionResetError as e:
            raise RuntimeError("data loader worker failed") from e
    except RuntimeError as wrapped:
        assert is_transient(wrapped)


# --------------------------------------------------------------------------- sweep
@pytest.mark.prefect
def test_sweep_2x2(prefect_harness, stages, tmp_path, monkeypatch):
    from matplotlib.image import imread
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.sweep import ablation_sweep

    grid = {"orpo.alpha": [0.5, 1.0], "orpo.beta": [0.05, 0.1]}
    recipe = str(_write_recipe(tmp_path))
    monkeypatch.setenv("ORPO_SWEEP_MAX_WORKERS", "2")  # two points train concurrently
    stages.train_seconds = 3.0  # longer than one task's bookkeeping (cache keys, stamps), so two parallel trainings overlap
    out = ablation_sweep(recipe=recipe, grid=grid)
    assert stages.max_active == 2
    # data stages shared: once; train + evaluate per point
    assert {k: len(v) for k, v in stages.calls.items()} == {"prepare": 1, "tokenize": 1, "train": 4, "evaluate": 4}
    # base evaluated once, with the first grid point (evaluations run concurrently: any order)
    with_base = [c["out"] for c in stages.calls["evaluate"] if c["compare_base"]]
    assert len(with_base) == 1 and "/a0.5-b0.05/" in with_base[0] + "/"
    expected = {f"a{a:g}-b{b:g}": acc_formula(a, b, 9) for a in (0.5, 1.0) for b in (0.05, 0.1)}
    rows = {row["point"]: row for row in out["points"]}
    assert set(rows) == set(expected)
    for point, acc in expected.items():
        assert rows[point]["preference/accuracy"] == pytest.approx(acc)
        assert rows[point]["status"] == "ok"
        assert (tmp_path / "run" / "sweep" / point / "train" / "model" / "state.json").is_file()
    # the stand-in intervals are +-0.05: the top two values (0.69 vs 0.64) overlap, so no "best"
    assert out["best"] is None and out["best_by_value"] == max(expected, key=expected.get)
    assert "no point is distinguishable from the others on `preference/accuracy`" in out["verdict"]
    assert out["base"]["preference/accuracy"] == 0.5
    sweep_dir = tmp_path / "run" / "sweep"
    assert json.loads((sweep_dir / "sweep.json").read_text())["best"] is None
    md = (sweep_dir / "sweep.md").read_text()
    assert all(f"| alpha={a:g}, beta={b:g} | {a:g} | {b:g} | " in md for a in (0.5, 1.0) for b in (0.05, 0.1))
    assert "| base model | – | – | 0.5 | – |" in md and "The base model's margin uses a0.5-b0.05's beta." in md
    # change vs base: paired where the point scored the base model (no paired delta in the stand-in)
    assert "| alpha=0.5, beta=0.05 | 0.5 | 0.05 | 0.59 [0.54, 0.64] | +0.09 |" in md
    png = sweep_dir / "sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(png)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["flowtest-sweep", "flowtest-sweep-report"])))
        from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

        trs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="train alpha=")))
    assert {a.key for a in arts} == {"flowtest-sweep"}  # one artifact: the table is not published twice
    report = sorted(arts, key=lambda a: a.created)[-1]
    assert report.type == "markdown" and "![sweep plot](data:image/png;base64," in report.data
    assert {t.name for t in trs} == {f"train alpha={a:g}, beta={b:g}" for a in (0.5, 1.0) for b in (0.05, 0.1)}
    assert all({"stage=train", "recipe=flowtest"} <= set(t.tags) for t in trs)
    assert any({"alpha=1", "beta=0.1"} <= set(t.tags) for t in trs)

    # the same sweep again: everything cached, nothing re-trained
    again = ablation_sweep(recipe=recipe, grid=grid)
    assert len(stages.calls["train"]) == 4 and len(stages.calls["evaluate"]) == 4
    assert {r["train"] for r in again["points"]} == {"Cached"}


@pytest.mark.prefect
def test_sweep_rejects_bad_grid_before_work(prefect_harness, stages, tmp_path):
    from flows.sweep import ablation_sweep
    from orpo_core.config import RecipeError

    recipe = str(_write_recipe(tmp_path))
    with pytest.raises(RecipeError, match="orpo.gamma"):
        ablation_sweep(recipe=recipe, grid={"orpo.beta": [0.1], "orpo.gamma": [1, 2]})
    with pytest.raises(ValueError, match="non-empty list"):
        ablation_sweep(recipe=recipe, grid={"orpo.beta": []})
    assert not stages.calls


@pytest.mark.prefect
def test_sweep_and_data_flow_take_the_run_folder_lock(prefect_harness, stages, tmp_path):
    """A live holder of ``<run>/sweep`` (another sweep) stops a sweep before any stage, and a
    live holder of ``<run>`` (a pipeline) stops the data flow; both run once it is released."""
    from flows.pipeline import data_flow
    from flows.sweep import ablation_sweep
    from orpo_core.runs.lock import RunFolderBusy, run_folder_lock

    recipe = str(_write_recipe(tmp_path))
    run = tmp_path / "run"
    with run_folder_lock(run / "sweep", flow_run_id="other-sweep"):
        with pytest.raises(RunFolderBusy, match=r"flow run other-sweep"):
            ablation_sweep(recipe=recipe, grid={"orpo.beta": [0.1, 0.2]})
    assert not stages.calls
    with run_folder_lock(run, flow_run_id="a-pipeline"):
        with pytest.raises(RunFolderBusy, match=r"flow run a-pipeline"):
            data_flow(recipe=recipe)
        # the sweep's points share <run>/data and <run>/tokenized: it needs <run> too
        with pytest.raises(RunFolderBusy, match=r"flow run a-pipeline"):
            ablation_sweep(recipe=recipe, grid={"orpo.beta": [0.1, 0.2]})
    assert not stages.calls

    assert data_flow(recipe=recipe)["stages"] == {"prepare": "Completed", "tokenize": "Completed"}
    out = ablation_sweep(recipe=recipe, grid={"orpo.beta": [0.1, 0.2]})
    assert [r["status"] for r in out["points"]] == ["ok", "ok"]
    assert len(stages.calls["train"]) == 2

    # the push flow (orpo push) takes <run> too: it must not publish a model a live run rewrites
    from flows.pipeline import push_flow

    (run / "train" / "model").mkdir(parents=True)
    with run_folder_lock(run, flow_run_id="a-pipeline"):
        with pytest.raises(RunFolderBusy, match=r"flow run a-pipeline"):
            push_flow(recipe=recipe)
    assert not (run / "hub").exists()


# --------------------------------------------------------------------------- retrain
@pytest.mark.prefect
def test_retrain_publishes_only_improvements(prefect_harness, stages, tmp_path, monkeypatch):
    import orpo_core.publish.hub as hub
    from flows.retrain import retrain

    uploads = []

    class FakeApi:
        def create_repo(self, *a, **k):
            pass

        def upload_folder(self, **kw):
            uploads.append(kw)
            return SimpleNamespace(commit_url=f"https://huggingface.co/x/commit/{len(uploads)}")

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # uploads are faked: not refused as offline
    monkeypatch.setenv("HF_TOKEN", "hf_fakefakefakefakefake")
    recipe = str(_write_recipe(tmp_path, hub={"push": True}))

    r1, s1, _ = _run(retrain, recipe=recipe)
    assert r1["action"] == "published" and r1["gate"]["publish"] and r1["gate"]["previous"] is None and len(uploads) == 1
    record = json.loads((tmp_path / "run" / "published.json").read_text())
    assert record["metrics"]["preference/accuracy"] == acc_formula(1.0, 0.1, 9)

    # same data and recipe: skipped before any stage, nothing published, the decision recorded
    r2, s2, _ = _run(retrain, recipe=recipe)
    assert r2["action"] == "skipped" and "unchanged" in r2["reason"] and s2 == {} and r2["stages"] == {}
    assert len(uploads) == 1 and len(stages.calls["prepare"]) == 1

    # fresh rows improve the stand-in metric -> trained, evaluated, published, record updated
    with open(tmp_path / "pairs.jsonl", "a") as f:
        f.write("\n" + json.dumps({"prompt": "fresh", "chosen": "a", "rejected": "b"}))
    r3, s3, _ = _run(retrain, recipe=recipe)
    assert r3["action"] == "published" and r3["gate"]["new"] > r3["gate"]["previous"] and len(uploads) == 2
    assert (s3["prepare"], s3["train"], s3["evaluate"]) == ("Completed", "Completed", "Completed")
    assert json.loads((tmp_path / "run" / "published.json").read_text())["metrics"]["preference/accuracy"] == acc_formula(1.0, 0.1, 10)

    # forced on unchanged data: the stages are cached, the gate keeps the published model
    r4, s4, _ = _run(retrain, recipe=recipe, force=True)
    assert r4["action"] == "kept" and not r4["gate"]["publish"] and r4["gate"]["previous_source"] == "record"
    assert (s4["tokenize"], s4["train"], s4["evaluate"]) == ("Cached", "Cached", "Cached") and "push" not in s4
    assert len(uploads) == 2

    lines = [json.loads(x) for x in (tmp_path / "run" / "retrain" / "decisions.jsonl").read_text().splitlines()]
    assert [x["action"] for x in lines] == ["published", "skipped", "published", "kept"]
    assert lines[0]["data"]["fingerprint"] == lines[1]["data"]["fingerprint"] != lines[2]["data"]["fingerprint"]
    assert lines[2]["previous_data_fingerprint"] == lines[1]["data"]["fingerprint"]
    assert json.loads((tmp_path / "run" / "retrain" / "last_decision.json").read_text())["action"] == "kept"
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["flowtest-retrain-decision"])))
    md = [a.data for a in sorted(arts, key=lambda a: a.created)]
    assert len(md) == 4 and md[1].startswith("# Retraining decision: skipped") and "| decision | **kept** |" in md[3]


def test_sweep_task_runner_reads_env_per_run(monkeypatch):
    from flows.sweep import SweepTaskRunner, ablation_sweep

    monkeypatch.setenv("ORPO_SWEEP_MAX_WORKERS", "3")
    assert ablation_sweep.task_runner.duplicate()._max_workers == 3
    monkeypatch.delenv("ORPO_SWEEP_MAX_WORKERS")
    assert ablation_sweep.task_runner.duplicate()._max_workers == 1  # default: no oversubscription
    assert SweepTaskRunner(max_workers=4).duplicate()._max_workers == 4


def test_gate_decision():
    from flows.retrain import gate_decision

    assert gate_decision(0.7, None)[0] is True
    assert gate_decision(None, 0.5)[0] is False
    assert gate_decision(0.7, 0.6, "max")[0] is True
    assert gate_decision(0.6, 0.6, "max")[0] is False
    assert gate_decision(5.0, 6.0, "min")[0] is True
    assert gate_decision(6.0, 5.0, "min")[0] is False


# --------------------------------------------------------------------------- cache-key units (no Prefect)
def test_file_and_dir_fingerprints(tmp_path):
    f = tmp_path / "d" / "a.bin"
    f.parent.mkdir()
    payload = os.urandom(3 << 20)  # several read chunks
    f.write_bytes(payload)
    assert file_sha256(f) == hashlib.sha256(payload).hexdigest()
    (tmp_path / "d" / "sub").mkdir()
    (tmp_path / "d" / "sub" / "b.txt").write_text("b")
    h1 = dir_fingerprint(tmp_path / "d")
    os.utime(f, ns=(1, 1))  # mtime changes, content does not
    assert dir_fingerprint(tmp_path / "d") == h1
    (tmp_path / "d" / "sub" / "b.txt").write_text("c")
    assert dir_fingerprint(tmp_path / "d") != h1
    (tmp_path / "d" / ".stage.json").write_text("{}")  # stamps are not content
    h2 = dir_fingerprint(tmp_path / "d")
    (tmp_path / "d" / ".stage.json").write_text('{"x": 1}')
    assert dir_fingerprint(tmp_path / "d") == h2
    assert dir_fingerprint(tmp_path / "missing").startswith("missing:")


def test_source_fingerprints(tmp_path, monkeypatch):
    p = tmp_path / "x.jsonl"
    p.write_text("1")
    local = source_fingerprint({"path": str(p)})
    p.write_text("2")
    assert source_fingerprint({"path": str(p)}) != local
    assert source_fingerprint({"path": "org/data", "revision": "abc"}) == "hub:org/data@abc"
    assert source_fingerprint({"synthetic": {"task": "arithmetic"}}) == "synthetic"
    monkeypatch.setenv("ORPO_UNPINNED_CACHE_HOURS", "24")
    t = 1_700_000_000.0
    day_start = t // 86400 * 86400
    assert unpinned_bucket(day_start) == unpinned_bucket(day_start + 86399)
    assert unpinned_bucket(day_start) != unpinned_bucket(day_start + 86400)
    assert "@unpinned:" in source_fingerprint({"path": "org/data"})


def test_stage_key_follows_stamp_and_recipe(tmp_path, monkeypatch):
    monkeypatch.setattr(caching, "code_fingerprint", lambda stage: "pinned")
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.parquet").write_bytes(b"rows")
    recipe = {"model": {"name_or_path": "m", "tiny": {"tokenizer": "char"}}, "data": {"max_length": 8, "max_prompt_length": 4}}
    inputs = {"recipe": recipe, "data_dir": str(data), "out_dir": str(tmp_path / "tok")}
    k1, k2 = stage_cache_key("tokenize", inputs), stage_cache_key("tokenize", inputs)
    assert k1 != k2  # no stamp yet: always a miss
    out = tmp_path / "tok"
    out.mkdir()
    (out / "train.parquet").write_bytes(b"ids")
    write_stamp(out, "tokenize", stage_base_key("tokenize", inputs), "the-key")
    assert read_stamp(out)["cache_key"] == "the-key"
    assert stage_cache_key("tokenize", inputs) == "the-key"  # intact output, same inputs: hit
    # the stamp's per-file hashes are reused for the folder's content hash
    assert dir_fingerprint(out) == dir_fingerprint(out)
    other = {**inputs, "recipe": {**recipe, "data": {"max_length": 9, "max_prompt_length": 4}}}
    assert stage_cache_key("tokenize", other) != "the-key"
    (data / "train.parquet").write_bytes(b"other rows")  # upstream content changed
    assert stage_cache_key("tokenize", inputs) != "the-key"
    (data / "train.parquet").write_bytes(b"rows")
    assert stage_cache_key("tokenize", inputs) == "the-key"
    (out / "extra.txt").write_text("x")  # output folder changed
    assert stage_cache_key("tokenize", inputs) != "the-key"


def test_grid_helpers():
    from flows.sweep import expand_grid, grid_abbreviations, point_suffix

    pts = expand_grid({"orpo.alpha": [0.5, 1.0], "orpo.beta": [0.05, 0.1, 0.2]})
    assert len(pts) == 6 and pts[0] == {"orpo.alpha": 0.5, "orpo.beta": 0.05} and pts[-1] == {"orpo.alpha": 1.0, "orpo.beta": 0.2}
    ab = grid_abbreviations(["orpo.alpha", "orpo.beta"])
    assert point_suffix(pts[0], ab) == "a0.5-b0.05"
    assert grid_abbreviations(["train.learning_rate"]) == {"train.learning_rate": "lr"}
    assert grid_abbreviations(["orpo.beta", "train.batch"]) == {"orpo.beta": "beta", "train.batch": "batch"}
    assert point_suffix({"peft.method": "lora", "x.flag": True}, grid_abbreviations(["peft.method", "x.flag"])) == "mlora-ftrue"
    for bad in ({}, {"orpo.beta": 0.1}, {"orpo.beta": []}, {"not a key": [1]}):
        with pytest.raises(ValueError):
            expand_grid(bad)


def test_run_folder_lock(tmp_path):
    """One holder at a time (fail fast with the holder named, or wait); released on a clean exit
    and when the holder is SIGKILLed, whose record is then handed to the next run."""
    import signal
    import subprocess

    from orpo_core.runs.lock import OWNER_NAME, RunFolderBusy, run_folder_lock

    run = tmp_path / "run"
    with run_folder_lock(run, flow_run_id="flow-a") as previous:
        assert previous is None
        assert json.loads((run / OWNER_NAME).read_text())["flow_run_id"] == "flow-a"
        t0 = time.monotonic()
        with pytest.raises(RunFolderBusy, match=rf"run folder {run} is in use by pid {os.getpid()} .*flow run flow-a"):
            with run_folder_lock(run, timeout_s=0.5):
                pass
        assert 0.4 < time.monotonic() - t0 < 10  # waited for the timeout, then failed
    assert not (run / OWNER_NAME).exists()
    with run_folder_lock(run) as previous:  # free again after a clean exit
        assert previous is None

    code = (
        "import os, signal, sys; from orpo_core.runs.lock import run_folder_lock\n"
        f"with run_folder_lock({str(run)!r}, flow_run_id='flow-killed'):\n"
        "    print('held', flush=True); os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert proc.stdout.strip() == "held" and proc.returncode == -signal.SIGKILL
    with run_folder_lock(run, timeout_s=0) as previous:  # the kernel released the dead holder's lock
        assert previous["flow_run_id"] == "flow-killed"

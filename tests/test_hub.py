"""Hub publishing: the upload folder, repo-id validation, push calls, retry classification, token hygiene."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import httpx2
import pytest
import yaml
from huggingface_hub import errors as hf_errors
from huggingface_hub.errors import HfHubHTTPError

import orpo_core.publish.hub as hub
from orpo_core.config import HubConfig, recipe_from_dict
from orpo_core.publish.hub import HubError, HubPushError, build_hub_folder, is_transient_error, push_folder, validate_repo_id

EVAL = {
    "results": {"trained": {"preference/accuracy": 0.8}, "base": {"preference/accuracy": 0.5}},
    "metrics": {"trained": {"preference/accuracy": {"value": 0.8, "n": 50, "ci95": [0.7, 0.9]}}},
}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _recipe(tmp_path: Path, **hub_over):
    return recipe_from_dict(
        {
            "run_name": "hub-test",
            "output_dir": str(tmp_path / "run"),
            "model": {"name_or_path": "tiny"},
            "data": {"sources": [{"synthetic": {"task": "arithmetic", "n_rows": 10}}]},
            "hub": {"repo_id": "tester/orpo-tiny", **hub_over},
        }
    )


def _hf_error(cls, status: int):
    resp = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/tester/x"))
    return cls(f"{status} {cls.__name__}", response=resp)


def _http_error(status: int, token: str = "") -> HfHubHTTPError:
    resp = httpx2.Response(status, request=httpx2.Request("POST", "https://huggingface.co/api/repos/create"))
    return HfHubHTTPError(f"{status} error for token {token}", response=resp)


class FakeHfApi:
    """Records calls; ``fail`` is a list of exceptions raised by successive upload_folder calls."""

    calls: list[tuple[str, dict]] = []
    fail: list[BaseException] = []

    def __init__(self, *a, **k):
        pass

    def create_repo(self, repo_id, **kw):
        FakeHfApi.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kw):
        FakeHfApi.calls.append(("create_branch", {"repo_id": repo_id, **kw}))

    def upload_folder(self, **kw):
        FakeHfApi.calls.append(("upload_folder", kw))
        # a careless library logging its token must not leak it (redacted by the push task)
        logging.getLogger("huggingface_hub").warning("uploading with token %s", kw.get("token"))
        if FakeHfApi.fail:
            raise FakeHfApi.fail.pop(0)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kw['repo_id']}/commit/0123abcd")


@pytest.fixture
def fake_api(monkeypatch):
    """A fake, reachable Hub: uploads are allowed (the tests' HF_HUB_OFFLINE=1 is lifted)."""
    from huggingface_hub import constants

    FakeHfApi.calls = []
    FakeHfApi.fail = []
    monkeypatch.setattr(hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return FakeHfApi


@pytest.fixture
def eval_dir(tmp_path):
    d = tmp_path / "eval"
    d.mkdir()
    (d / "eval.json").write_text(json.dumps(EVAL))
    (d / "curves.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    return d


# --------------------------------------------------------------------------- folder
def test_build_hub_folder_contents(tmp_path, tiny_model_dir, eval_dir):
    r = _recipe(tmp_path)
    model = tmp_path / "train" / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "training_args.bin").write_bytes(b"pickle")  # never uploaded
    (tmp_path / "train" / "metrics.json").write_text(json.dumps({"train_loss": 2.5}))
    out = build_hub_folder(r, model, eval_dir / "eval.json", tmp_path / "hub")
    names = {p.name for p in out.iterdir()}
    assert {"README.md", "orpo_recipe.yaml", "eval_results.json", "training_curves.png", "config.json", "model.safetensors"} <= names
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith(".bin") for n in names)
    for f in model.glob("*.safetensors"):
        assert _sha(out / f.name) == _sha(f)
    assert json.loads((out / "eval_results.json").read_text()) == EVAL

    # absolute local paths in eval.json are made relative to the run folder (or reduced to a name)
    local = {**EVAL, "models": {"trained": {"path": str(model.resolve())}, "base": {"path": "/opt/models/base"}},
             "hub_model": "HuggingFaceTB/SmolLM3-3B-Base", "note": "see /tmp in text"}
    (eval_dir / "eval.json").write_text(json.dumps(local))
    out = build_hub_folder(r, model, eval_dir / "eval.json", tmp_path / "hub")
    shipped = json.loads((out / "eval_results.json").read_text())
    assert shipped["models"] == {"trained": {"path": "train/model"}, "base": {"path": "<local>/base"}}
    assert shipped["hub_model"] == "HuggingFaceTB/SmolLM3-3B-Base" and shipped["note"] == "see /tmp in text"
    assert str(tmp_path) not in (out / "eval_results.json").read_text()
    (eval_dir / "eval.json").write_text(json.dumps(EVAL))
    assert yaml.safe_load((out / "orpo_recipe.yaml").read_text()) == r.to_dict()
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "| `train_loss` | 2.5 |" in card and "training_curves.png" in card

    # the folder loads like a Hub checkpoint and gives the same logits as the source model
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(out)("2 + 2 = 4", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
        b = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(ids).logits
    assert torch.equal(a, b)

    # rebuilding replaces the folder atomically, leaving no temp folders behind
    (out / "stale.txt").write_text("old")
    build_hub_folder(r, model, None, tmp_path / "hub")
    assert not (tmp_path / "hub" / "stale.txt").exists()
    assert not (tmp_path / "hub" / "eval_results.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_build_hub_folder_bad_model(tmp_path):
    r = _recipe(tmp_path)
    with pytest.raises(HubError, match="does not exist"):
        build_hub_folder(r, tmp_path / "nope", None, tmp_path / "hub")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    (bad / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(HubError, match="no \\*.safetensors"):
        build_hub_folder(r, bad, None, tmp_path / "hub")
    (bad / "config.json").unlink()
    (bad / "model.safetensors").write_bytes(b"x")
    with pytest.raises(HubError, match="config.json"):
        build_hub_folder(r, bad, None, tmp_path / "hub")
    assert not (tmp_path / "hub").exists()


@pytest.mark.parametrize("repo_id", ["", None, "no-namespace", "a/b/c", "bad id/x", "ns/--bad--", "ns/" + "x" * 100])
def test_invalid_repo_ids(repo_id):
    with pytest.raises(HubError):
        validate_repo_id(repo_id)


def test_valid_repo_id():
    assert validate_repo_id("your-username/SmolLM3-3B-ORPO_v1.2") == "your-username/SmolLM3-3B-ORPO_v1.2"


# --------------------------------------------------------------------------- push
def test_push_folder_calls(tmp_path, fake_api):
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "README.md").write_text("card")
    cfg = HubConfig(repo_id="tester/orpo-tiny", private=True, revision="v2", commit_message="ORPO run 7")
    url = push_folder(folder, cfg, "hf_faketoken")
    assert url == "https://huggingface.co/tester/orpo-tiny/commit/0123abcd"
    names = [c[0] for c in fake_api.calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    create, branch, upload = (c[1] for c in fake_api.calls)
    assert create["private"] is True and create["exist_ok"] is True and create["token"] == "hf_faketoken"
    assert branch["branch"] == "v2" and branch["exist_ok"] is True
    assert upload["revision"] == "v2" and upload["commit_message"] == "ORPO run 7"
    assert Path(upload["folder_path"]) == folder

    fake_api.calls.clear()
    push_folder(folder, HubConfig(repo_id="tester/orpo-tiny"), "hf_faketoken")
    assert [c[0] for c in fake_api.calls] == ["create_repo", "upload_folder"]  # no branch without revision
    assert fake_api.calls[1][1]["revision"] is None


def test_push_folder_errors(tmp_path, fake_api):
    folder = tmp_path / "hub"
    folder.mkdir()
    with pytest.raises(HubError, match="README.md"):
        push_folder(folder, HubConfig(repo_id="tester/x"), "hf_tok")
    (folder / "README.md").write_text("card")
    with pytest.raises(HubError, match="token"):
        push_folder(folder, HubConfig(repo_id="tester/x"), None)
    with pytest.raises(HubError, match="repo_id"):
        push_folder(folder, HubConfig(), "hf_tok")
    token = "hf_secretsecretsecret123"
    fake_api.fail = [_http_error(503, token)]
    with pytest.raises(HubPushError) as ei:
        push_folder(folder, HubConfig(repo_id="tester/x"), token)
    assert ei.value.transient and ei.value.status_code == 503
    assert token not in str(ei.value) and "<redacted>" in str(ei.value)
    fake_api.fail = [_http_error(401)]
    with pytest.raises(HubPushError) as ei:
        push_folder(folder, HubConfig(repo_id="tester/x"), token)
    assert not ei.value.transient and ei.value.status_code == 401


@pytest.mark.parametrize(
    "exc, transient",
    [
        (TimeoutError("slow"), True),
        (ConnectionError("reset"), True),
        (httpx2.ReadTimeout("read timed out"), True),
        (_http_error(429), True),
        (_http_error(500), True),
        (_http_error(503), True),
        (_http_error(401), False),
        (_http_error(403), False),
        (_http_error(404), False),
        (HubError("bad repo"), False),
        (ValueError("bad"), False),
        (FileNotFoundError("x"), False),
        # huggingface_hub's permanent errors, some of them ConnectionError / HTTPError subclasses
        (hf_errors.OfflineModeIsEnabled("offline mode is enabled"), False),
        (_hf_error(hf_errors.RepositoryNotFoundError, 404), False),
        (_hf_error(hf_errors.RevisionNotFoundError, 404), False),
        (hf_errors.EntryNotFoundError("README.md"), False),
        (_hf_error(hf_errors.GatedRepoError, 403), False),
        (PermissionError(13, "Permission denied"), False),
        (HubPushError("upload failed: 401", status_code=401, transient=False), False),
        # DNS, connection reset, 502 / 429 from the Hub
        (socket.gaierror(-3, "Temporary failure in name resolution"), True),
        (ConnectionResetError(104, "Connection reset by peer"), True),
        (_hf_error(HfHubHTTPError, 502), True),
        (_hf_error(HfHubHTTPError, 429), True),
    ],
)
def test_transient_classification(exc, transient):
    """The push task's retry condition and the stages' (orpo_core.runs.retry.is_transient) agree."""
    from orpo_core.runs.retry import is_transient

    assert is_transient_error(exc) is transient
    assert is_transient(exc) is transient


def test_offline_mode_refuses_upload_before_any_call(tmp_path, tiny_model_dir, fake_api, monkeypatch):
    """HF_HUB_OFFLINE=1: push_folder raises HubError (permanent) before creating a repo or uploading."""
    from huggingface_hub import constants

    folder = build_hub_folder(_recipe(tmp_path), tiny_model_dir, None, tmp_path / "hub")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE=1") as ei:
        push_folder(folder, HubConfig(repo_id="tester/x"), "hf_tok")
    assert fake_api.calls == [] and not is_transient_error(ei.value)


def test_read_published_metrics(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from orpo_core.publish.card import render_model_card

    card = tmp_path / "README.md"
    card.write_text(render_model_card(_recipe(tmp_path), EVAL))
    assert hub.read_published_metrics("tester/orpo-tiny") is None  # HF_HUB_OFFLINE in tests
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda *a, **k: str(card))
    assert hub.read_published_metrics("tester/orpo-tiny") == {"preference/accuracy": 0.8}

    def boom(*a, **k):
        raise OSError("network down")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", boom)
    assert hub.read_published_metrics("tester/orpo-tiny") is None


# --------------------------------------------------------------------------- through Prefect
def _run_dir(tmp_path: Path, tiny_model_dir: Path, eval_dir: Path, push: bool = True) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "train" / "model")
    shutil.copytree(eval_dir, run / "eval")
    recipe = {
        "run_name": "hub-flow-test",
        "output_dir": str(run),
        "model": {"name_or_path": "tiny"},
        "data": {"sources": [{"synthetic": {"task": "arithmetic", "n_rows": 10}}]},
        "hub": {"repo_id": "tester/orpo-tiny", "push": push, "revision": "main"},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _all_bytes_under(root: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in root.rglob("*") if p.is_file()]


@pytest.mark.prefect
def test_token_never_leaks(prefect_harness, tmp_path, tiny_model_dir, eval_dir, fake_api, monkeypatch, caplog):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from flows.pipeline import push_flow

    token = "hf_" + "LeakCanary" + os.urandom(8).hex()
    monkeypatch.setenv("HF_TOKEN", token)
    caplog.set_level(logging.INFO)
    # Prefect may reconfigure the root logger when a flow starts: attach caplog's handler to the
    # library loggers themselves so every record of the run is captured
    watched = [logging.getLogger(n) for n in ("prefect", "huggingface_hub", "orpo_core", "tasks", "flows")]
    for lg in watched:
        monkeypatch.setattr(lg, "handlers", [*lg.handlers, caplog.handler])
    recipe = _run_dir(tmp_path, tiny_model_dir, eval_dir)
    state = push_flow(recipe=str(recipe), dry_run=False, return_state=True)
    result = state.result()
    assert result["pushed"] and result["url"].endswith("/commit/0123abcd")
    upload = next(c[1] for c in fake_api.calls if c[0] == "upload_folder")
    assert upload["token"] == token  # the token was really used ...
    assert upload["revision"] == "main"

    # ... and appears nowhere: hub folder (model card included), run folder, task results, logs
    run = tmp_path / "run"
    assert (run / "hub" / "README.md").is_file() and (run / "published.json").is_file()
    results_dir = Path(os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"])
    for root in (run, results_dir):
        for path, data in _all_bytes_under(root):
            assert token.encode() not in data, f"token found in {path}"
    assert token not in json.dumps(result)
    assert "uploading with token <redacted>" in caplog.text
    assert "Finished in state Completed" in caplog.text  # the run's own logs were captured too
    assert token not in caplog.text
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
        params = client.read_flow_run(state.state_details.flow_run_id).parameters
    assert logs and not any(token in lg.message for lg in logs)
    assert token not in json.dumps(params)


@pytest.mark.prefect
def test_push_retries_only_transient(prefect_harness, tmp_path, tiny_model_dir, eval_dir, fake_api, monkeypatch):
    import flows.pipeline as pipeline
    from tasks.push import push_task

    monkeypatch.setenv("HF_TOKEN", "hf_dummytokendummytoken")
    monkeypatch.setattr(pipeline, "push_task", push_task.with_options(retry_delay_seconds=0, retry_jitter_factor=None))
    recipe = _run_dir(tmp_path, tiny_model_dir, eval_dir)

    fake_api.fail = [_http_error(503), httpx2.ConnectTimeout("connect timed out")]
    out = pipeline.push_flow(recipe=str(recipe), dry_run=False)
    uploads = [c for c in fake_api.calls if c[0] == "upload_folder"]
    assert out["pushed"] and len(uploads) == 3  # two transient failures retried

    fake_api.calls.clear()
    fake_api.fail = [_http_error(401)]
    with pytest.raises(HubPushError, match="401"):
        pipeline.push_flow(recipe=str(recipe), dry_run=False)
    assert len([c for c in fake_api.calls if c[0] == "upload_folder"]) == 1  # permanent: no retry


@pytest.mark.prefect
def test_push_dry_run_uploads_nothing(prefect_harness, tmp_path, tiny_model_dir, eval_dir, fake_api, monkeypatch):
    from flows.pipeline import push_flow

    monkeypatch.delenv("HF_TOKEN", raising=False)
    recipe = _run_dir(tmp_path, tiny_model_dir, eval_dir, push=False)
    out = push_flow(recipe=str(recipe))  # dry_run None -> not hub.push -> dry run
    assert out["dry_run"] and not out["pushed"] and out["url"] is None
    assert fake_api.calls == []
    assert (tmp_path / "run" / "hub" / "README.md").is_file()
    assert not (tmp_path / "run" / "published.json").exists()


@pytest.mark.prefect
def test_token_resolution_order(prefect_harness, monkeypatch):
    from prefect.blocks.system import Secret

    from tasks.push import resolve_hf_token

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("ORPO_HF_TOKEN_BLOCK", "orpo-test-hf-token")
    Secret(value="hf_fromsecretblock0000").save("orpo-test-hf-token", overwrite=True)
    assert resolve_hf_token() == "hf_fromsecretblock0000"
    monkeypatch.setenv("HF_TOKEN", "hf_fromenvironment0000")
    assert resolve_hf_token() == "hf_fromenvironment0000"  # the environment wins

"""prefect.yaml is what `prefect deploy` accepts, and every deployment's parameters fit its flow."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = ROOT / "prefect.yaml"
K8S_YAML = ROOT / "deploy" / "prefect-k8s.yaml"
K8S_TEMPLATE = ROOT / "deploy" / "k8s-gpu-base-job-template.json"


@pytest.fixture(scope="module", params=["prefect.yaml", "deploy/prefect-k8s.yaml"])
def raw(request) -> dict:
    return yaml.safe_load((ROOT / request.param).read_text())


@pytest.fixture(scope="module")
def main_yaml() -> dict:
    return yaml.safe_load(PREFECT_YAML.read_text())


@pytest.fixture(scope="module")
def k8s_yaml() -> dict:
    return yaml.safe_load(K8S_YAML.read_text())


@pytest.fixture(scope="module")
def model(raw):
    from prefect.cli.deploy._models import PrefectYamlModel

    return PrefectYamlModel.model_validate(raw)


def _deployments(raw) -> dict[str, dict]:
    return {d["name"]: d for d in raw["deployments"]}


def test_validates_against_prefect_schema(raw, model):
    from prefect.cli.deploy._models import DeploymentConfig, PrefectYamlModel, WorkPoolConfig

    assert len(model.deployments) == len(raw["deployments"]) >= 1
    # Prefect's model ignores unknown keys: make sure there are none (a typo would be silently dropped)
    top = {f.alias or n for n, f in PrefectYamlModel.model_fields.items()} | {"definitions"}
    assert set(raw) <= top, set(raw) - top
    for d in raw["deployments"]:
        assert set(d) <= set(DeploymentConfig.model_fields), (d["name"], set(d) - set(DeploymentConfig.model_fields))
        assert set(d["work_pool"]) <= set(WorkPoolConfig.model_fields)
        assert d["name"] and d["entrypoint"] and d["work_pool"]["name"]
    assert len(set(_deployments(raw))) == len(raw["deployments"])  # unique names


@pytest.mark.parametrize("path", [PREFECT_YAML, K8S_YAML])
def test_prefect_deploy_loader_accepts_file(path):
    """The loader `prefect deploy` uses reports no validation problem for our files."""
    from rich.console import Console

    from prefect.cli.deploy._config import _load_deploy_configs_and_actions

    console = Console(record=True, width=200)
    configs, actions = _load_deploy_configs_and_actions(path, console=console)
    assert console.export_text().strip() == ""
    assert len(configs) == len(yaml.safe_load(path.read_text())["deployments"])
    assert actions["pull"] and "prefect.deployments.steps.set_working_directory" in actions["pull"][0]


def test_parameters_match_flow_signatures(raw):
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import validate

    from orpo_core.config import load_recipe

    for d in raw["deployments"]:
        flow = load_flow_from_entrypoint(str(ROOT / d["entrypoint"].split(":")[0]) + ":" + d["entrypoint"].split(":")[1])
        schema = parameter_schema(flow).model_dump_for_openapi()
        params = d.get("parameters", {})
        errors = validate(params, schema, raise_on_error=False)
        assert not errors, (d["name"], [e.message for e in errors])
        assert set(schema["required"]) <= set(params), (d["name"], "missing required parameters")
        assert set(params) <= set(schema["properties"]), (d["name"], "unknown parameters")
        # a wrong type is caught by the same validation (the check above is not vacuous)
        bad = {**params, "recipe": 123}
        assert validate(bad, schema, raise_on_error=False)
        # the recipe and overrides are valid inputs of the pipeline
        load_recipe(ROOT / params["recipe"], params.get("overrides") or [])
        if "grid" in params:
            from flows.sweep import expand_grid

            assert len(expand_grid(params["grid"])) >= 2
            load_recipe(ROOT / params["recipe"], [f"{k}={json.dumps(v[0])}" for k, v in params["grid"].items()])
        if d.get("enforce_parameter_schema") is not None:
            assert d["enforce_parameter_schema"] is True


def test_pools_schedules_and_flows(main_yaml, k8s_yaml):
    from prefect.cli.deploy._models import RawScheduleConfig
    from prefect.client.schemas.schedules import CronSchedule

    raw = main_yaml
    # `prefect deploy --all` on prefect.yaml needs only the README's two process pools
    assert {d["work_pool"]["name"] for d in raw["deployments"]} == {"gpu-process", "cpu-process"}
    assert {d["work_pool"]["name"] for d in k8s_yaml["deployments"]} == {"gpu-k8s"}
    deps = _deployments(raw)
    by_flow: dict[str, list[dict]] = {}
    for d in deps.values():
        by_flow.setdefault(d["entrypoint"], []).append(d)
    # pipeline, sweep and scheduled retraining on a GPU pool; data prep on a CPU pool; k8s GPU variant
    assert {d["work_pool"]["name"] for d in by_flow["flows/pipeline.py:orpo_pipeline"]} == {"gpu-process"}
    assert [d["entrypoint"] for d in k8s_yaml["deployments"]] == ["flows/pipeline.py:orpo_pipeline"]
    assert all(d["work_pool"]["name"].startswith("gpu") for d in by_flow["flows/sweep.py:ablation_sweep"])
    assert [d["work_pool"]["name"] for d in by_flow["flows/pipeline.py:data_flow"]] == ["cpu-process"]
    assert by_flow["flows/pipeline.py:data_flow"][0]["work_pool"]["job_variables"]["env"]["CUDA_VISIBLE_DEVICES"] == ""
    retrains = by_flow["flows/retrain.py:retrain"]
    assert retrains and all(d["work_pool"]["name"].startswith("gpu") for d in retrains)
    for d in retrains:
        assert d["schedules"]
        for s in d["schedules"]:
            cfg = RawScheduleConfig.model_validate(s)
            assert cfg.cron
            CronSchedule(cron=cfg.cron, timezone=cfg.timezone)  # a valid cron expression and time zone
    with pytest.raises(ValueError):
        CronSchedule(cron="61 3 * * 1")
    # the split deployment points at an existing data deployment (flow name / deployment name)
    split = deps["orpo-pipeline-split"]["work_pool"]["job_variables"]["env"]["ORPO_DATA_DEPLOYMENT"]
    flow_name, dep_name = split.split("/")
    from prefect.flows import load_flow_from_entrypoint

    data_dep = deps[dep_name]
    assert load_flow_from_entrypoint(str(ROOT / "flows/pipeline.py") + ":" + data_dep["entrypoint"].split(":")[1]).name == flow_name
    # no secret in the file
    for path in (PREFECT_YAML, K8S_YAML):
        text = path.read_text()
        assert "hf_" not in text.replace("hf-cache", "") and "HF_TOKEN:" not in text


def test_k8s_gpu_base_job_template(k8s_yaml):
    raw = k8s_yaml
    from prefect.server.schemas.actions import validate_base_job_template

    template = json.loads(K8S_TEMPLATE.read_text())
    validate_base_job_template(template)  # every placeholder is a declared variable
    spec = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert template["variables"]["properties"]["gpu_count"]["default"] >= 1
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    # the k8s deployment only sets variables the template declares
    k8s = [d for d in raw["deployments"] if d["work_pool"]["name"] == "gpu-k8s"]
    assert k8s
    for d in k8s:
        assert set(d["work_pool"]["job_variables"]) <= set(template["variables"]["properties"])
    # the validator is not vacuous: an undeclared placeholder is rejected
    broken = copy.deepcopy(template)
    del broken["variables"]["properties"]["gpu_count"]
    with pytest.raises(ValueError, match="gpu_count"):
        validate_base_job_template(broken)

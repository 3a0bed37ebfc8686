"""``train.distributed``: accelerate config writing, launch command, output streaming, rank failures.

The configs are checked with accelerate's own readers (``load_config_from_file`` and the
``accelerate launch`` argument validation) and, when DeepSpeed is installed, DeepSpeed's own
config schema (``deepspeed.runtime.config.DeepSpeedConfig``). The slow tests start real
2-process gloo runs (DDP on CPU).
"""

from __future__ import annotations

import json
import logging
import sys
import textwrap
import os
from pathlib import Path

import pytest
import yaml

from orpo_train_entry import build_tokenized, recipe_dict


def _recipe(tmp_path: Path, distributed: dict, **train):
    from orpo_core.config import recipe_from_dict

    return recipe_from_dict(recipe_dict(tmp_path / "run", train={**train, "distributed": distributed}))


def _launch_args(config_file: Path):
    """What ``accelerate launch --config_file FILE -m orpo_core.training.launch`` makes of the file."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "-m", "orpo_core.training.launch"])
    _validate_launch_command(args)
    return args


# --------------------------------------------------------------------------- recipe section
def test_recipe_section_validation(tmp_path):
    from orpo_core.config import RecipeError

    r = _recipe(tmp_path, {"num_processes": "auto"})
    assert r.train.distributed.num_processes == "auto" and r.train.distributed.strategy == "ddp"
    bad = [
        ({"num_processes": 0}, "train.distributed.num_processes"),
        ({"num_processes": 1, "strategy": "fsdp"}, "needs num_processes >= 2"),
        ({"num_processes": 4, "num_machines": 2}, "main_process_ip"),
        ({"num_processes": 3, "num_machines": 2, "main_process_ip": "10.0.0.1"}, "multiple of num_machines"),
        ({"num_processes": 4, "num_machines": 2, "machine_rank": 2, "main_process_ip": "h"}, "machine_rank"),
        ({"num_processes": 2, "strategy": "deepspeed", "deepspeed": {"zero_stage": 2, "offload_param_device": "cpu"}}, "zero_stage 3"),
        ({"num_processes": 2, "strategy": "horovod"}, "train.distributed.strategy"),
        ({"num_processes": 2, "fsdp": {"sharding": "FULL_SHARD"}}, "unknown key"),
    ]
    for section, needle in bad:
        with pytest.raises(RecipeError) as e:
            _recipe(tmp_path, section)
        assert needle in str(e.value), (section, str(e.value))


def test_num_processes_auto_and_launcher_choice(tmp_path):
    from orpo_core.training.launch import describe, resolve_num_processes, uses_launcher

    auto = _recipe(tmp_path, {"num_processes": "auto"}).train.distributed
    assert resolve_num_processes(auto, gpus=0) == 1 and not uses_launcher(auto, gpus=0)  # CPU: in-process
    assert resolve_num_processes(auto, gpus=8) == 8 and uses_launcher(auto, gpus=8)
    multi = _recipe(tmp_path, {"num_processes": "auto", "num_machines": 2, "main_process_ip": "h0"}).train.distributed
    assert resolve_num_processes(multi, gpus=4) == 8
    one = _recipe(tmp_path, {}).train.distributed
    assert not uses_launcher(one, gpus=8) and describe(one, gpus=8)["strategy"] == "single-process"
    assert describe(auto, gpus=8) == {"strategy": "ddp", "num_processes": 8, "num_machines": 1}


# --------------------------------------------------------------------------- accelerate config
def test_ddp_config_on_cpu_is_what_accelerate_launch_reads(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    from orpo_core.training.launch import write_accelerate_config

    r = _recipe(tmp_path, {"num_processes": 2})
    path = write_accelerate_config(r, tmp_path / "acc.yaml", gpus=0)
    raw = yaml.safe_load(path.read_text())
    assert raw["distributed_type"] == "MULTI_GPU" and raw["use_cpu"] is True and raw["num_processes"] == 2
    cfg = load_config_from_file(str(path))
    assert cfg.num_processes == 2 and cfg.main_process_port == 0  # 0: accelerate picks a free port
    args = _launch_args(path)
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed and args.num_processes == 2


def test_fsdp_config_is_what_accelerate_launch_reads(tmp_path):
    from accelerate.utils.launch import prepare_multi_gpu_env

    from orpo_core.training.launch import write_accelerate_config

    r = _recipe(
        tmp_path,
        {
            "num_processes": 16, "strategy": "fsdp", "num_machines": 2, "machine_rank": 1, "main_process_ip": "10.0.0.5",
            "fsdp": {"sharding_strategy": "SHARD_GRAD_OP", "cpu_offload": True, "state_dict_type": "SHARDED_STATE_DICT",
                     "transformer_layer_cls_to_wrap": "SmolLM3DecoderLayer"},
        },
    )
    path = write_accelerate_config(r, tmp_path / "acc.yaml", gpus=8)
    args = _launch_args(path)
    assert args.use_fsdp and args.num_processes == 16 and args.num_machines == 2 and args.machine_rank == 1
    assert args.main_process_ip == "10.0.0.5" and args.main_process_port == 29500
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert env["FSDP_RESHARD_AFTER_FORWARD"] == "shard_grad_op"  # FSDP1: the sharding strategy
    assert env["FSDP_OFFLOAD_PARAMS"] == "true" and env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "SmolLM3DecoderLayer"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    # torchrun arguments for 8 processes on each of 2 machines, rendezvous at machine 0
    assert args.nproc_per_node == "8" and args.nnodes == "2" and args.node_rank == 1
    assert args.rdzv_endpoint == "10.0.0.5:29500" and args.rdzv_backend == "static"


def test_zero3_requires_unfused_loss(tmp_path):
    from orpo_core.config import RecipeError
    from orpo_core.training.launch import accelerate_config

    r = _recipe(tmp_path, {"num_processes": 8, "strategy": "deepspeed", "deepspeed": {"zero_stage": 3}})
    with pytest.raises(RecipeError, match="orpo.fused_loss: false"):
        accelerate_config(r, gpus=8)
    r.orpo.fused_loss = False
    assert accelerate_config(r, gpus=8)["deepspeed_config"]["zero_stage"] == 3
    r2 = _recipe(tmp_path, {"num_processes": 8, "strategy": "deepspeed", "deepspeed": {"zero_stage": 2}})
    assert accelerate_config(r2, gpus=8)["deepspeed_config"]["zero_stage"] == 2


def test_fsdp_and_deepspeed_checkpoints_count_as_complete(tmp_path):
    """Checkpoint layouts of Trainer under FSDP and DeepSpeed are resumable (a plain-DDP-only
    completeness check would delete them as 'incomplete' on resume)."""
    from orpo_core.training.run import latest_checkpoint

    def ckpt(name, files, dirs=()):
        c = tmp_path / name
        c.mkdir(parents=True)
        for f in ("trainer_state.json", "rng_state_0.pth", *files):
            (c / f).write_text("x")
        for d in dirs:
            (c / d).mkdir()
            (c / d / "part").write_text("x")
        return c

    ckpt("full/checkpoint-2", ["pytorch_model_fsdp.bin", "optimizer.bin", "scheduler.pt"])
    assert latest_checkpoint(tmp_path / "full").endswith("checkpoint-2")
    ckpt("sharded/checkpoint-4", ["scheduler.pt"], ["pytorch_model_fsdp_0", "optimizer_0"])
    assert latest_checkpoint(tmp_path / "sharded").endswith("checkpoint-4")
    ckpt("ds/checkpoint-6", ["latest", "model.safetensors"], ["global_step6"])
    assert latest_checkpoint(tmp_path / "ds").endswith("checkpoint-6")
    ckpt("cut/checkpoint-8", ["pytorch_model_fsdp.bin", "scheduler.pt"])  # optimizer never written
    assert latest_checkpoint(tmp_path / "cut") is None


def test_more_processes_than_gpus_refused(tmp_path):
    from orpo_core.config import RecipeError
    from orpo_core.training.launch import accelerate_config

    r = _recipe(tmp_path, {"num_processes": 4})
    with pytest.raises(RecipeError, match="4 processes per machine but this machine has 2 visible GPU"):
        accelerate_config(r, gpus=2)
    assert accelerate_config(r, gpus=4)["num_processes"] == 4
    assert accelerate_config(r, gpus=0)["num_processes"] == 4  # CPU: gloo processes, any number


def test_fsdp_and_deepspeed_refused_on_cpu(tmp_path):
    from orpo_core.config import RecipeError
    from orpo_core.training.launch import accelerate_config

    for strategy in ("fsdp", "deepspeed"):
        r = _recipe(tmp_path, {"num_processes": 2, "strategy": strategy})
        with pytest.raises(RecipeError, match="needs CUDA GPUs"):
            accelerate_config(r, gpus=0)


def _deepspeed_effective_config(tmp_path: Path, recipe, monkeypatch) -> dict:
    """The DeepSpeed config a rank would build: accelerate config file -> ``accelerate launch``
    argument handling -> launcher environment -> ``DeepSpeedPlugin`` (in TrainingArguments) ->
    transformers' ``HfTrainerDeepSpeedConfig`` with the recipe's TrainingArguments."""
    from accelerate.utils.launch import prepare_deepspeed_cmd_env
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from orpo_core.training.launch import write_accelerate_config
    from orpo_core.training.run import build_training_args

    path = write_accelerate_config(recipe, tmp_path / "acc.yaml", gpus=8)
    args = _launch_args(path)
    assert args.use_deepspeed and args.num_processes == 8
    ds_fields = list(yaml.safe_load(path.read_text())["deepspeed_config"])
    args.deepspeed_fields_from_accelerate_config = ",".join(ds_fields + ["mixed_precision"])
    _, env = prepare_deepspeed_cmd_env(args)
    for k, v in env.items():
        if k.startswith("ACCELERATE_"):
            monkeypatch.setenv(k, v)
    targs = build_training_args(recipe, tmp_path / "out", has_eval=False)
    hf = HfTrainerDeepSpeedConfig(targs.deepspeed_plugin.hf_ds_config.config)
    hf.trainer_config_process(targs)
    import torch

    model = torch.nn.Linear(4, 4)
    model.config = type("Cfg", (), {"hidden_size": 64, "hidden_sizes": None})()
    hf.trainer_config_finalize(targs, model, num_training_steps=100)
    return hf.config, targs.world_size


def test_deepspeed_config_passes_deepspeeds_own_schema(tmp_path, monkeypatch):
    pytest.importorskip("deepspeed", reason="DeepSpeed is optional (pip install deepspeed); its schema check is skipped")
    from deepspeed.runtime.config import DeepSpeedConfig

    r = _recipe(
        tmp_path,
        {"num_processes": 8, "strategy": "deepspeed",
         "deepspeed": {"zero_stage": 3, "offload_optimizer_device": "cpu", "offload_param_device": "cpu"}},
        gradient_accumulation_steps=2,
    )
    r.orpo.fused_loss = False  # ZeRO-3 needs the unfused loss (see test_zero3_requires_unfused_loss)
    cfg, world = _deepspeed_effective_config(tmp_path, r, monkeypatch)

    class MPU:  # DeepSpeed asks the data-parallel size of the process group this config would run in
        def get_data_parallel_world_size(self):
            return world

        def get_data_parallel_rank(self):
            return 0

        def get_model_parallel_world_size(self):
            return 1

    ds = DeepSpeedConfig(dict(cfg), mpu=MPU())
    assert ds.zero_optimization_stage == 3
    assert ds.zero_config.offload_param.device == "cpu" and ds.zero_config.offload_optimizer.device == "cpu"
    assert ds.gradient_accumulation_steps == 2 and ds.train_micro_batch_size_per_gpu == r.train.per_device_train_batch_size
    assert ds.gradient_clipping == r.train.max_grad_norm and ds.zero_config.gather_16bit_weights_on_model_save
    # the schema does reject what is wrong
    bad = json.loads(json.dumps(cfg))
    bad["zero_optimization"]["stage"] = 7
    with pytest.raises(Exception):
        DeepSpeedConfig(bad, mpu=MPU())


# --------------------------------------------------------------------------- streaming / failures
FAKE_LAUNCH = textwrap.dedent(
    """
    import json, os, sys, time
    print("launcher says hi", flush=True)
    print("[rank0]:INFO orpo_core.training.run: hello from 0", flush=True)
    print("[rank1]:WARNING x: careful from 1", flush=True)
    print('[rank0]:ORPO_EVENT ' + json.dumps({"event": "log", "global_step": 3, "max_steps": 5, "logs": {"loss": 1.5}}), flush=True)
    print('[rank1]:ORPO_EVENT ' + json.dumps({"event": "log", "global_step": 3, "max_steps": 5, "logs": {"loss": 9.9}}), flush=True)
    d = os.environ["ORPO_RANK_ERROR_DIR"]; os.makedirs(d, exist_ok=True)
    def err(rank, typ, mro, msg, t):
        json.dump({"rank": rank, "type": typ, "mro": mro, "message": msg, "time": t,
                   "traceback": ["Traceback (most recent call last):", f"  File x, in rank{rank}", f"{typ}: {msg}"]},
                  open(os.path.join(d, f"rank{rank}.json"), "w"))
    err(0, "DistBackendError", ["DistBackendError", "RuntimeError", "Exception"], "connection reset", time.time() + 5)
    err(1, "TrainInputError", ["TrainInputError", "ValueError", "Exception"], "row 3: field 'chosen_input_ids' is empty", time.time())
    sys.exit(%d)
    """
)


def test_stream_launch_routes_lines_replays_rank0_events_and_reports_first_failing_rank(tmp_path):
    from orpo_core.training.launch import RankFailedError, RankInputError, _failure, stream_launch

    seen: list[tuple[int, str]] = []
    logs: list[dict] = []

    class CB:
        def on_log(self, args, state, control, logs=None, **kw):
            logs_seen = dict(logs)
            logs_seen["_step"], logs_seen["_max"] = state.global_step, state.max_steps
            logs_list.append(logs_seen)

    logs_list = logs
    err_dir = tmp_path / "errors"
    env = {"ORPO_RANK_ERROR_DIR": str(err_dir), "PATH": "/usr/bin:/bin"}
    rc, tails = stream_launch([sys.executable, "-c", FAKE_LAUNCH % 1], env, lambda lvl, msg: seen.append((lvl, msg)), [CB()])
    assert rc == 1
    assert (logging.INFO, "launcher | launcher says hi") in seen
    assert (logging.INFO, "rank 0 | INFO orpo_core.training.run: hello from 0") in seen
    assert (logging.WARNING, "rank 1 | WARNING x: careful from 1") in seen
    assert not [m for _, m in seen if "ORPO_EVENT" in m]
    assert logs == [{"loss": 1.5, "_step": 3, "_max": 5}]  # rank 0 only
    exc = _failure(rc, err_dir, tails)
    # rank 1 failed first (rank 0 only saw the broken connection afterwards): its error is the cause
    assert isinstance(exc, RankInputError) and isinstance(exc, ValueError) and exc.rank == 1
    assert "rank 1 failed with TrainInputError: row 3: field 'chosen_input_ids' is empty" in str(exc)
    assert "then rank 0 (DistBackendError)" in str(exc) and "File x, in rank1" in str(exc)

    # nobody reported: the last lines of the last rank that spoke, not retried as bad input
    exc = _failure(137, tmp_path / "none", tails)
    assert type(exc) is RankFailedError and exc.rank == 1 and "careful from 1" in str(exc)


@pytest.mark.slow
def test_rank_error_fails_with_that_ranks_traceback(tmp_path):
    """A real 2-process launch on a tokenized folder without train.parquet: each rank raises
    TrainInputError; the error names a rank, its exception and its traceback, and is a
    ValueError (bad input: the Prefect task does not retry it)."""
    from orpo_core.training.launch import RankInputError, train_distributed

    r = _recipe(tmp_path, {"num_processes": 2})
    tok = build_tokenized(r, where=tmp_path / "prep")
    (tok / "train.parquet").unlink()
    lines: list[str] = []
    with pytest.raises(RankInputError) as e:
        train_distributed(r, tok, tmp_path / "run" / "train", line_logger=lambda lvl, m: lines.append(m), gpus=0)
    msg = str(e.value)
    assert e.value.rank in (0, 1) and e.value.error_type == "TrainInputError" and "train.parquet" in msg
    assert "Traceback (most recent call last)" in msg and "orpo_core/training/launch.py" in msg
    assert any(m.startswith("rank 0 |") for m in lines) and any(m.startswith("rank 1 |") for m in lines)


# --------------------------------------------------------------------------- deploy/ examples
ROOT = Path(__file__).resolve().parent.parent


def test_multi_gpu_process_pool_example_is_deployable_and_its_recipes_launch(tmp_path):
    from prefect.cli.deploy._config import _load_deploy_configs_and_actions
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import validate
    from rich.console import Console

    from orpo_core.config import load_recipe
    from orpo_core.training.launch import accelerate_config, write_accelerate_config

    path = ROOT / "deploy" / "multi-gpu-process-pool.yaml"
    console = Console(record=True, width=200)
    configs, _ = _load_deploy_configs_and_actions(path, console=console)
    assert console.export_text().strip() == "" and len(configs) == 4
    raw = yaml.safe_load(path.read_text())
    names = {f"{'orpo-pipeline' if 'pipeline.py' in d['entrypoint'] else 'orpo-ablation-sweep'}/{d['name']}" for d in raw["deployments"]}
    strategies = set()
    for d in raw["deployments"]:
        file, fn = d["entrypoint"].split(":")
        schema = parameter_schema(load_flow_from_entrypoint(f"{ROOT / file}:{fn}")).model_dump_for_openapi()
        assert not validate(d["parameters"], schema, raise_on_error=False), d["name"]
        r = load_recipe(ROOT / d["parameters"]["recipe"], d["parameters"]["overrides"])
        assert r.train.distributed.num_processes == "auto"
        if "grid" in d["parameters"]:
            assert d["parameters"]["fan_out"] is True and d["parameters"]["pipeline_deployment"] in names
            continue
        assert "concurrency_limit" not in d  # would serialise the fan-out (exclusivity: worker --limit 1)
        strategies.add(r.train.distributed.strategy)
        cfg = write_accelerate_config(r, tmp_path / f"{d['name']}.yaml", gpus=8)
        args = _launch_args(cfg)
        assert args.num_processes == 8
        assert (args.use_fsdp, args.use_deepspeed) == (r.train.distributed.strategy == "fsdp", r.train.distributed.strategy == "deepspeed")
        # effective batch of the SmolLM3 exercise: 8 GPUs x 2 pairs x 1 accumulation step = 16
        assert 8 * r.train.per_device_train_batch_size * r.train.gradient_accumulation_steps == 16
        assert accelerate_config(r, gpus=8)["distributed_type"] in ("MULTI_GPU", "FSDP", "DEEPSPEED")
    assert strategies == {"ddp", "fsdp", "deepspeed"}


def test_k8s_multinode_job_gives_each_pod_its_machine_rank_and_one_rendezvous(tmp_path):
    import shlex

    from orpo_core.config import load_recipe
    from orpo_core.training.launch import write_accelerate_config

    doc = json.loads((ROOT / "deploy" / "k8s-multinode-indexed-job.json").read_text())
    svc = next(i for i in doc["items"] if i["kind"] == "Service")
    job = next(i for i in doc["items"] if i["kind"] == "Job")
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    spec = job["spec"]
    pod = spec["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    assert pod["subdomain"] == svc["metadata"]["name"]
    container = pod["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert int(env["NUM_MACHINES"]) == spec["completions"]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    port = svc["spec"]["ports"][0]["port"]
    for index in range(spec["completions"]):
        cmd = container["args"][0]
        for k, v in {**env, "JOB_COMPLETION_INDEX": str(index)}.items():
            cmd = cmd.replace(f'"${k}"', shlex.quote(v))
        argv = shlex.split(cmd)
        assert argv[:5] == ["exec", "python", "-m", "orpo_core.training.launch", "launch"]
        overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        r = load_recipe(ROOT / argv[5], overrides)
        d = r.train.distributed
        # pod 0 of the indexed Job is <job>-0.<service> in the cluster DNS: the rendezvous host
        assert d.main_process_ip == f"{job['metadata']['name']}-0.{svc['metadata']['name']}" and d.main_process_port == port
        args = _launch_args(write_accelerate_config(r, tmp_path / f"m{index}.yaml", gpus=gpus))
        assert args.num_machines == spec["completions"] and args.machine_rank == index
        assert args.num_processes == gpus * spec["completions"] and args.use_fsdp
        if index > 0:  # (machine 0 would check that the port is free here)
            from accelerate.utils.launch import prepare_multi_gpu_env

            prepare_multi_gpu_env(args)
            assert args.nproc_per_node == str(gpus) and args.rdzv_endpoint == f"{d.main_process_ip}:{port}"


def test_launch_env_puts_the_checkout_on_pythonpath():
    from orpo_core.training.launch import launch_env

    root = Path(launch_env(0, base={})["PYTHONPATH"].split(os.pathsep)[0])
    assert (root / "orpo_core" / "training" / "launch.py").is_file()

"""Several training processes: ``train.distributed`` -> accelerate config -> ``accelerate launch``.

:func:`train_distributed` is :func:`orpo_core.training.run.run_training` for a recipe whose
``train.distributed`` asks for more than one process (or machine). It

1. writes ``<out_dir>/launch/recipe.json`` (the validated recipe) and
   ``<out_dir>/launch/accelerate_config.yaml``, built with accelerate's own
   ``ClusterConfig`` (the file ``accelerate config`` would write: ``distributed_type``
   ``MULTI_GPU`` / ``FSDP`` / ``DEEPSPEED``, ``num_processes``, ``num_machines``,
   ``machine_rank``, ``main_process_ip`` / ``port``, ``fsdp_config`` or
   ``deepspeed_config``), read back with ``load_config_from_file`` so a file accelerate
   would refuse is never launched;
2. runs ``python -m accelerate.commands.launch --config_file … -m orpo_core.training.launch
   --recipe … --tokenized … --out … --resume|--no-resume`` as a subprocess in its own
   process group (killed with it when the caller is interrupted). torchrun (accelerate's
   launcher for DDP and FSDP, and for DeepSpeed with ``deepspeed_multinode_launcher:
   standard``) prefixes every line of rank *k* with ``[rank<k>]:``;
3. streams the merged output line by line to ``line_logger`` as ``rank k | …``
   (launcher lines as ``launcher | …``), keeps the last lines of each rank, and replays
   rank 0's Trainer events (train begin, logs, steps, train end; sent as ``ORPO_EVENT``
   JSON lines) to the caller's ``transformers.TrainerCallback`` objects, so a progress
   callback works as in the in-process path;
4. on a non-zero exit raises :class:`RankFailedError` carrying the first failing rank's
   exception type, message and traceback tail (each rank writes
   ``launch/errors/rank<k>.json`` before it exits; the first by time is the cause, the
   others usually report the broken process group). A rank that failed on bad input
   (``ValueError``, ``TypeError``, ``KeyError``, ``FileNotFoundError``) raises
   :class:`RankInputError`, a ``ValueError``, so the Prefect task does not retry it.

On a CPU-only host the processes use gloo: the config says ``use_cpu: true`` and the
environment gets ``ACCELERATE_USE_CPU=1`` (accelerate's multi-GPU launcher with CPU
processes; ``--cpu`` alone would start one process). Resuming works as in-process:
each rank calls ``run_training(resume=…)``, which restores the latest complete checkpoint.

Running the module (``python -m orpo_core.training.launch --recipe …``) is the per-rank entry
point; ``python -m orpo_core.training.launch launch RECIPE`` runs :func:`train_distributed` for
this machine without Prefect (each machine of a multi-node job runs it with its own
``train.distributed.machine_rank``). This module does not import Prefect.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable

from orpo_core.config import DistributedConfig, Recipe

logger = logging.getLogger("orpo_core.training.launch")  # also when run as __main__

__all__ = [
    "RankFailedError",
    "RankInputError",
    "resolve_num_processes",
    "uses_launcher",
    "accelerate_config",
    "write_accelerate_config",
    "launch_command",
    "launch_env",
    "stream_launch",
    "train_distributed",
    "describe",
]

LAUNCH_DIR = "launch"
CONFIG_NAME = "accelerate_config.yaml"
RECIPE_NAME = "recipe.json"
ERRORS_DIR = "errors"
EVENT_PREFIX = "ORPO_EVENT "
TAIL_LINES = 40
_RANK_RE = re.compile(r"^\[rank(\d+)\]:(.*)$")
_LEVEL_RE = re.compile(r"^\s*(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b")
_INPUT_ERRORS = ("ValueError", "TypeError", "KeyError", "FileNotFoundError", "NotADirectoryError")


class RankFailedError(RuntimeError):
    """A training process failed. ``rank`` (None when no rank reported an error, e.g. the
    launcher itself failed or a rank was killed), ``error_type``, ``returncode`` and
    ``traceback_tail`` (the rank's last traceback lines, or its last output lines)."""

    def __init__(self, message: str, *, rank: int | None, error_type: str | None, returncode: int, traceback_tail: str):
        super().__init__(message)
        self.rank = rank
        self.error_type = error_type
        self.returncode = returncode
        self.traceback_tail = traceback_tail


class RankInputError(RankFailedError, ValueError):
    """A rank failed on bad input (its exception was a ValueError, TypeError, KeyError or
    FileNotFoundError): retrying cannot help."""


# --------------------------------------------------------------------------- config
def visible_gpus() -> int:
    """Number of CUDA devices torch sees (0 on a CPU-only host)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_num_processes(cfg: DistributedConfig, gpus: int | None = None) -> int:
    """Total processes over all machines: ``num_processes``, or for ``auto`` the visible
    GPUs (``gpus``, default :func:`visible_gpus`) times ``num_machines``, at least 1 per machine."""
    if cfg.num_processes != "auto":
        return int(cfg.num_processes)
    n = visible_gpus() if gpus is None else gpus
    return max(1, n) * cfg.num_machines


def uses_launcher(cfg: DistributedConfig, gpus: int | None = None) -> bool:
    """True when training needs ``accelerate launch`` (more than one process or machine)."""
    return cfg.num_machines > 1 or resolve_num_processes(cfg, gpus) > 1


def describe(cfg: DistributedConfig, gpus: int | None = None) -> dict[str, Any]:
    """What a run records about its parallelism: strategy, processes, machines (and the
    FSDP / ZeRO options that matter), e.g. for ``metrics.json``."""
    n = resolve_num_processes(cfg, gpus)
    out: dict[str, Any] = {"strategy": cfg.strategy if uses_launcher(cfg, gpus) else "single-process",
                           "num_processes": n, "num_machines": cfg.num_machines}
    if out["strategy"] == "fsdp":
        out["fsdp"] = {k: getattr(cfg.fsdp, k) for k in ("version", "sharding_strategy", "cpu_offload", "state_dict_type")}
    elif out["strategy"] == "deepspeed":
        out["deepspeed"] = {"zero_stage": cfg.deepspeed.zero_stage, "offload_optimizer_device": cfg.deepspeed.offload_optimizer_device,
                            "offload_param_device": cfg.deepspeed.offload_param_device}
    return out


def _mixed_precision(recipe: Recipe) -> str:
    from orpo_core.models.precision import resolve_precision

    p, _ = resolve_precision(recipe.train.precision)  # auto: as the launched processes will resolve it
    return p if p in ("bf16", "fp16") else "no"


def _fsdp_dict(recipe: Recipe) -> dict[str, Any]:
    f = recipe.train.distributed.fsdp
    d: dict[str, Any] = {
        "fsdp_version": f.version,
        "fsdp_offload_params": f.cpu_offload,
        "fsdp_auto_wrap_policy": f.auto_wrap_policy,
        "fsdp_state_dict_type": f.state_dict_type,
        "fsdp_cpu_ram_efficient_loading": False,
        # every rank loads the full weights itself (no rank-0-only loading), so nothing needs broadcasting
        "fsdp_sync_module_states": False,
        "fsdp_activation_checkpointing": f.activation_checkpointing,
    }
    if f.version == 1:
        d.update(
            fsdp_reshard_after_forward=f.sharding_strategy,
            fsdp_backward_prefetch="BACKWARD_PRE",
            fsdp_forward_prefetch=False,
            fsdp_use_orig_params=f.use_orig_params,
        )
    else:
        d["fsdp_reshard_after_forward"] = f.sharding_strategy == "FULL_SHARD"
    if f.auto_wrap_policy == "TRANSFORMER_BASED_WRAP" and f.transformer_layer_cls_to_wrap:
        d["fsdp_transformer_layer_cls_to_wrap"] = f.transformer_layer_cls_to_wrap
    if f.auto_wrap_policy == "SIZE_BASED_WRAP":
        d["fsdp_min_num_params"] = f.min_num_params
    return d


def _deepspeed_dict(recipe: Recipe) -> dict[str, Any]:
    z = recipe.train.distributed.deepspeed
    if z.config_file:
        return {"deepspeed_config_file": str(Path(z.config_file).resolve()), "deepspeed_multinode_launcher": "standard",
                "zero3_init_flag": z.zero3_init_flag}
    d: dict[str, Any] = {
        "zero_stage": z.zero_stage,
        "offload_optimizer_device": z.offload_optimizer_device,
        "offload_param_device": z.offload_param_device,
        "gradient_accumulation_steps": recipe.train.gradient_accumulation_steps,
        "gradient_clipping": recipe.train.max_grad_norm if recipe.train.max_grad_norm > 0 else None,
        "zero3_init_flag": z.zero3_init_flag,
        "zero3_save_16bit_model": z.zero3_save_16bit_model,
        # one launcher (torchrun) per machine, as for DDP / FSDP, instead of pdsh from machine 0
        "deepspeed_multinode_launcher": "standard",
    }
    if z.offload_nvme_path:
        if z.offload_param_device == "nvme":
            d["offload_param_nvme_path"] = z.offload_nvme_path
        if z.offload_optimizer_device == "nvme":
            d["offload_optimizer_nvme_path"] = z.offload_nvme_path
    return {k: v for k, v in d.items() if v is not None}


def accelerate_config(recipe: Recipe, gpus: int | None = None) -> dict[str, Any]:
    """The accelerate config (``ClusterConfig.to_dict()``) for ``recipe.train.distributed``.

    ``gpus``: visible GPUs (default: ask torch); 0 means CPU processes over gloo.

    Raises:
        orpo_core.config.RecipeError: the section asks for one process on one machine
            (nothing to launch).
    """
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import ComputeEnvironment, DistributedType

    from orpo_core.config import RecipeError

    cfg = recipe.train.distributed
    gpus = visible_gpus() if gpus is None else gpus
    n = resolve_num_processes(cfg, gpus)
    if not uses_launcher(cfg, gpus):
        raise RecipeError("train.distributed: one process on one machine trains in-process (no accelerate launch)")
    if gpus == 0 and cfg.strategy != "ddp":
        # accelerate 1.15 gives CPU processes DistributedType.MULTI_CPU and then ignores the FSDP plugin
        # (plain DDP would run under an 'fsdp' label); DeepSpeed's CPU backend needs oneCCL
        raise RecipeError(
            f"train.distributed.strategy {cfg.strategy} needs CUDA GPUs (accelerate runs CPU processes as plain DDP); "
            "use strategy ddp on a CPU-only host"
        )
    if gpus > 0 and n // cfg.num_machines > gpus:
        raise RecipeError(f"train.distributed.num_processes {cfg.num_processes}: {n // cfg.num_machines} processes per machine "
                          f"but this machine has {gpus} visible GPU(s)")
    if cfg.strategy == "deepspeed" and cfg.deepspeed.zero_stage == 3 and recipe.orpo.fused_loss and not cfg.deepspeed.config_file:
        # the fused loss reads the lm-head weight outside the model's forward; ZeRO-3 has released it there
        raise RecipeError("train.distributed.deepspeed.zero_stage 3 needs orpo.fused_loss: false "
                          "(ZeRO-3 partitions the lm-head weight the fused loss reads outside the forward)")
    dtype = {"ddp": DistributedType.MULTI_GPU, "fsdp": DistributedType.FSDP, "deepspeed": DistributedType.DEEPSPEED}[cfg.strategy]
    port = cfg.main_process_port
    if port is None:
        port = 29500 if cfg.num_machines > 1 else 0  # 0: accelerate picks a free port
    cc = ClusterConfig(
        compute_environment=ComputeEnvironment.LOCAL_MACHINE,
        distributed_type=dtype,
        mixed_precision=_mixed_precision(recipe),
        use_cpu=gpus == 0,
        debug=False,
        num_processes=n,
        machine_rank=cfg.machine_rank,
        num_machines=cfg.num_machines,
        gpu_ids="all",
        main_process_ip=cfg.main_process_ip if cfg.num_machines > 1 else None,
        main_process_port=port,
        rdzv_backend="static",
        main_training_function="main",
        enable_cpu_affinity=False,
        downcast_bf16=False,
        fsdp_config=_fsdp_dict(recipe) if cfg.strategy == "fsdp" else {},
        deepspeed_config=_deepspeed_dict(recipe) if cfg.strategy == "deepspeed" else {},
        dynamo_config={},
    )
    return cc.to_dict()


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_accelerate_config(recipe: Recipe, path: str | Path, gpus: int | None = None) -> Path:
    """Write :func:`accelerate_config` as YAML to ``path`` (atomically) and read it back with
    accelerate's ``load_config_from_file`` (which rejects unknown keys and bad enum values).

    Raises:
        ValueError: accelerate refuses the written file (the file is removed).
    """
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file

    p = Path(path)
    _atomic_write(p, yaml.safe_dump(accelerate_config(recipe, gpus), sort_keys=True))
    try:
        load_config_from_file(str(p))
    except Exception as e:
        p.unlink(missing_ok=True)
        raise ValueError(f"accelerate refuses the generated config {p}: {e}") from e
    return p


def launch_command(config_file: str | Path, recipe_json: str | Path, tokenized_dir: str | Path, out_dir: str | Path,
                   resume: bool, log_dir: str | Path) -> list[str]:
    """``accelerate launch`` argv running this module's per-rank entry point.

    ``--tee 3`` with ``log_dir`` makes torchrun copy each rank's stdout/stderr to the
    console with a ``[rank<k>]:`` prefix (see :func:`launch_env`)."""
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(config_file),
        "--tee", "3", "--log_dir", str(log_dir),
        "-m", "orpo_core.training.launch",
        "--recipe", str(recipe_json),
        "--tokenized", str(tokenized_dir),
        "--out", str(out_dir),
        "--resume" if resume else "--no-resume",
    ]


def launch_env(gpus: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of the launcher: unbuffered Python, torchrun's ``[rank<k>]:`` line prefix,
    no tokenizer threads, this project importable (``PYTHONPATH``), and on a CPU-only host
    ``ACCELERATE_USE_CPU=1`` (gloo)."""
    env = dict(os.environ if base is None else base)
    root = str(Path(__file__).resolve().parents[2])  # the checkout holding orpo_core/
    env["PYTHONPATH"] = os.pathsep.join([root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]])
    env["PYTHONUNBUFFERED"] = "1"
    env["TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"] = "[rank${rank}]:"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TQDM_DISABLE", "1")  # progress bars redraw with \r: noise in a line log
    if gpus == 0:
        env["ACCELERATE_USE_CPU"] = "1"
    return env


# --------------------------------------------------------------------------- streaming
class _State:
    """Stand-in for ``transformers.TrainerState`` when replaying rank 0's events."""

    def __init__(self) -> None:
        self.global_step = 0
        self.max_steps = 0
        self.epoch = 0.0
        self.log_history: list[dict[str, Any]] = []
        self.is_world_process_zero = True


def _replay(event: dict[str, Any], state: _State, callbacks: Iterable[Any]) -> None:
    state.global_step = int(event.get("global_step", state.global_step))
    state.max_steps = int(event.get("max_steps", state.max_steps))
    state.epoch = float(event.get("epoch") or 0.0)
    kind = event.get("event")
    method = {"train_begin": "on_train_begin", "step_end": "on_step_end", "log": "on_log", "train_end": "on_train_end"}.get(kind)
    if method is None:
        return
    kwargs: dict[str, Any] = {}
    if kind == "log":
        kwargs["logs"] = event.get("logs") or {}
        state.log_history.append({**kwargs["logs"], "step": state.global_step})
    for cb in callbacks:
        fn = getattr(cb, method, None)
        if fn is None:
            continue
        try:
            fn(None, state, None, **kwargs)
        except Exception as e:  # noqa: BLE001 - a display callback must not stop training
            logger.warning("callback %s.%s failed: %s", type(cb).__name__, method, e)


def _log(line_logger: Any, level: int, msg: str) -> None:
    if line_logger is None:
        logger.log(level, "%s", msg)
    elif hasattr(line_logger, "log"):
        line_logger.log(level, "%s", msg)
    else:
        line_logger(level, msg)


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """Linux: SIGTERM the launcher when the process that started it dies (a killed flow-run
    process must not leave training processes behind; torchrun passes SIGTERM to its ranks)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def stop_process_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """Stop a process started with ``start_new_session=True`` and its children: SIGTERM to
    its process group, SIGKILL after ``grace_s`` seconds; returns once it has exited."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except (ProcessLookupError, PermissionError):
        return
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def stream_launch(
    cmd: list[str],
    env: dict[str, str],
    line_logger: Callable[[int, str], None] | logging.Logger | None = None,
    callbacks: Iterable[Any] = (),
    cwd: str | Path | None = None,
) -> tuple[int, dict[int | None, collections.deque]]:
    """Run ``cmd`` (in its own process group, terminated when this process dies), stream its
    merged stdout/stderr.

    Each line ``[rank<k>]:text`` goes to ``line_logger`` as ``rank k | text``, other lines as
    ``launcher | text``; a leading level name (``WARNING``, ``ERROR`` …) picks the log level.
    ``line_logger`` is a ``logging.Logger``-like object (``.log(level, msg, *args)``) or a
    callable ``(level, line)``. Rank 0's ``ORPO_EVENT`` lines are replayed to ``callbacks``
    instead of being logged.

    Returns:
        ``(returncode, {rank or None: deque of its last lines})``.
    """
    tails: dict[int | None, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=TAIL_LINES))
    state = _State()
    callbacks = list(callbacks)

    def emit(level: int, msg: str) -> None:
        _log(line_logger, level, msg)

    proc = subprocess.Popen(
        cmd, env=env, cwd=str(cwd) if cwd else None, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, bufsize=1, errors="replace", start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            m = _RANK_RE.match(line)
            rank = int(m.group(1)) if m else None
            text = m.group(2) if m else line
            if text.startswith(EVENT_PREFIX):
                if rank in (0, None):
                    try:
                        _replay(json.loads(text[len(EVENT_PREFIX):]), state, callbacks)
                    except ValueError:
                        pass
                continue
            tails[rank].append(text)
            lm = _LEVEL_RE.match(text)
            level = getattr(logging, lm.group(1)) if lm else logging.INFO
            emit(level, f"{'launcher' if rank is None else f'rank {rank}'} | {text}")
        rc = proc.wait()
    except BaseException:
        stop_process_group(proc)
        raise
    return rc, tails


def _read_rank_errors(err_dir: Path) -> list[dict[str, Any]]:
    out = []
    for f in sorted(err_dir.glob("rank*.json")) if err_dir.is_dir() else []:
        try:
            out.append(json.loads(f.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda e: e.get("time", 0.0))


def _failure(rc: int, err_dir: Path, tails: dict[int | None, collections.deque]) -> RankFailedError:
    errors = _read_rank_errors(err_dir)
    if errors:
        first = errors[0]
        others = ", ".join(f"rank {e['rank']} ({e['type']})" for e in errors[1:])
        tb = "\n".join(first.get("traceback", [])[-TAIL_LINES:])
        msg = (f"training rank {first['rank']} failed with {first['type']}: {first['message']}"
               + (f" (then {others})" if others else "") + f"\n--- rank {first['rank']} traceback (last lines) ---\n{tb}")
        cls = RankInputError if set(first.get("mro", [])) & set(_INPUT_ERRORS) else RankFailedError
        return cls(msg, rank=first["rank"], error_type=first["type"], returncode=rc, traceback_tail=tb)
    # no rank reported (killed, OOM, launcher error): the last lines of whoever spoke last
    ranks = sorted((r for r in tails if r is not None))
    rank = ranks[-1] if ranks else None
    tail = "\n".join(list(tails.get(rank, []))[-TAIL_LINES:] + ([] if rank is None else ["--- launcher ---", *list(tails.get(None, []))[-10:]]))
    who = "the launcher" if rank is None else f"rank {rank} (no error report: killed?)"
    return RankFailedError(f"distributed training exited with code {rc}; last output of {who}:\n{tail}",
                           rank=rank, error_type=None, returncode=rc, traceback_tail=tail)


def train_distributed(recipe: Recipe, tokenized_dir: str | Path, out_dir: str | Path, resume: bool = True,
                      callbacks: list | None = None, line_logger: Any = None, gpus: int | None = None) -> dict[str, Any]:
    """Train with ``accelerate launch`` as ``recipe.train.distributed`` says (see module docstring).

    Same arguments and result as :func:`orpo_core.training.run.run_training`, plus ``line_logger``
    (where each output line goes, default this module's logger) and ``gpus`` (visible GPUs,
    default: ask torch). The result is rank 0's ``metrics.json`` plus ``distributed``
    (:func:`describe`), which is also written into ``metrics.json``. On a machine with
    ``machine_rank > 0`` only ``{"distributed", "machine_rank"}`` (machine 0 writes the files).

    Raises:
        RankInputError: a rank failed on bad input (not worth a retry).
        RankFailedError: a rank failed otherwise, or the launcher did.
    """
    gpus = visible_gpus() if gpus is None else gpus
    out = Path(out_dir)
    launch_dir = out / LAUNCH_DIR
    err_dir = launch_dir / ERRORS_DIR
    if recipe.train.distributed.machine_rank == 0:
        shutil.rmtree(err_dir, ignore_errors=True)
        (out / "metrics.json").unlink(missing_ok=True)
    launch_dir.mkdir(parents=True, exist_ok=True)
    # several machines may share this folder: one config per machine rank
    tag = "" if recipe.train.distributed.num_machines == 1 else f".machine{recipe.train.distributed.machine_rank}"
    recipe_json = launch_dir / RECIPE_NAME.replace(".json", f"{tag}.json")
    _atomic_write(recipe_json, json.dumps(recipe.to_dict(), indent=2))
    cfg_file = write_accelerate_config(recipe, launch_dir / CONFIG_NAME.replace(".yaml", f"{tag}.yaml"), gpus)
    info = describe(recipe.train.distributed, gpus)
    with tempfile.TemporaryDirectory(prefix="orpo-launch-") as log_dir:
        cmd = launch_command(cfg_file, recipe_json, Path(tokenized_dir).resolve(), out.resolve(), resume, log_dir)
        env = launch_env(gpus)
        env["ORPO_RANK_ERROR_DIR"] = str(err_dir.resolve())
        _log(line_logger, logging.INFO,
             f"launching {info['strategy']} training: {info['num_processes']} process(es) on {info['num_machines']} "
             f"machine(s) (this is machine {recipe.train.distributed.machine_rank}), config {cfg_file}")
        rc, tails = stream_launch(cmd, env, line_logger, callbacks or ())
    if rc != 0:
        raise _failure(rc, err_dir, tails)
    metrics_file = out / "metrics.json"
    if recipe.train.distributed.machine_rank != 0:
        return {"distributed": info, "machine_rank": recipe.train.distributed.machine_rank}
    if not metrics_file.is_file():
        raise RankFailedError(f"distributed training exited 0 but wrote no {metrics_file}", rank=0, error_type=None,
                              returncode=rc, traceback_tail="\n".join(tails.get(0, [])))
    metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    metrics["distributed"] = info
    _atomic_write(metrics_file, json.dumps(metrics, indent=2))
    return metrics


# --------------------------------------------------------------------------- per-rank entry point
def _event_callback():
    from transformers.trainer_callback import TrainerCallback  # the submodule: thread-safe, unlike the lazy top-level name

    class EventPrinter(TrainerCallback):
        """Prints rank 0's Trainer events as ``ORPO_EVENT`` JSON lines (steps at most every
        2 s) and logs each log dict on every rank."""

        def __init__(self) -> None:
            self._last = 0.0

        def _emit(self, event: str, state, **extra: Any) -> None:
            if not state.is_world_process_zero:
                return
            payload = {"event": event, "global_step": state.global_step, "max_steps": state.max_steps,
                       "epoch": state.epoch, **extra}
            print(EVENT_PREFIX + json.dumps(payload, default=str), flush=True)

        def on_train_begin(self, args, state, control, **kw):
            self._emit("train_begin", state)

        def on_step_end(self, args, state, control, **kw):
            now = time.monotonic()
            if now - self._last >= 2.0:
                self._last = now
                self._emit("step_end", state)

        def on_log(self, args, state, control, logs=None, **kw):
            logs = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float, str))}
            logger.info("step %d/%d %s", state.global_step, state.max_steps, json.dumps(logs))
            self._emit("log", state, logs=logs)

        def on_train_end(self, args, state, control, **kw):
            self._emit("train_end", state)

    return EventPrinter()


def _write_rank_error(exc: BaseException) -> None:
    err_dir = os.environ.get("ORPO_RANK_ERROR_DIR")
    if not err_dir:
        return
    rank = int(os.environ.get("RANK", "0"))
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    record = {
        "rank": rank,
        "type": type(exc).__name__,
        "mro": [c.__name__ for c in type(exc).__mro__],
        "message": str(exc)[:4000],
        "traceback": "".join(tb).splitlines()[-TAIL_LINES:],
        "time": time.time(),
        "host": os.uname().nodename,
    }
    try:
        _atomic_write(Path(err_dir) / f"rank{rank}.json", json.dumps(record, indent=2))
    except OSError:
        pass


def launch_main(argv: list[str]) -> int:
    """``python -m orpo_core.training.launch launch RECIPE [--set k=v …] [--tokenized DIR] [--out DIR] [--no-resume]``:
    :func:`train_distributed` for this machine outside Prefect (e.g. each pod of a multi-node
    Kubernetes Job, ``deploy/k8s-multinode-indexed-job.json``). Defaults: ``<output_dir>/tokenized``
    and ``<output_dir>/train``, as ``orpo train``. Exit codes: 0 done, 1 a rank failed, 2 bad recipe."""
    from orpo_core.config import RecipeError, load_recipe

    ap = argparse.ArgumentParser(prog="python -m orpo_core.training.launch launch")
    ap.add_argument("recipe")
    ap.add_argument("--set", "-s", dest="overrides", action="append", default=[], help="section.key=value (repeatable)")
    ap.add_argument("--tokenized", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-resume", dest="resume", action="store_false", default=True)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    try:
        recipe = load_recipe(a.recipe, a.overrides)
        recipe.require_model()
        tokenized = Path(a.tokenized) if a.tokenized else recipe.out_dir / "tokenized"
        out = Path(a.out) if a.out else recipe.out_dir / "train"
        if not uses_launcher(recipe.train.distributed):
            raise RecipeError("train.distributed asks for one process on one machine: use `orpo train`")
        metrics = train_distributed(recipe, tokenized, out, resume=a.resume)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RankFailedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: metrics.get(k) for k in ("global_step", "resumed_from", "distributed")}, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Per-rank entry point (started by ``accelerate launch``): train with ``run_training``.

    On an exception, writes ``$ORPO_RANK_ERROR_DIR/rank<RANK>.json`` (type, message,
    traceback tail, time) and re-raises, so the launcher exits non-zero."""
    ap = argparse.ArgumentParser(prog="python -m orpo_core.training.launch")
    ap.add_argument("--recipe", required=True, help="recipe JSON (Recipe.to_dict())")
    ap.add_argument("--tokenized", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume", dest="resume", action="store_true", default=True)
    ap.add_argument("--no-resume", dest="resume", action="store_false")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from orpo_core.config import recipe_from_dict
        from orpo_core.training.run import run_training

        recipe = recipe_from_dict(json.loads(Path(a.recipe).read_text(encoding="utf-8")), where=a.recipe)
        run_training(recipe, a.tokenized, a.out, resume=a.resume, callbacks=[_event_callback()])
    except BaseException as e:
        _write_rank_error(e)
        raise
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["launch"]:
        sys.exit(launch_main(sys.argv[2:]))
    sys.exit(main())

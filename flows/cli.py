"""The ``orpo`` command line.

Stage commands (``prep``, ``train``, ``eval``) call ``orpo_core`` directly and need no
Prefect server. Every command that writes into the run folder holds its lock
(:mod:`orpo_core.runs.lock`; ``run``, ``sweep`` and ``push`` check it before starting a server)
and fails at once with ``RunFolderBusy`` naming the holder; each prints the run folder
(``output_dir`` made absolute) on stderr. Orchestrated
commands (``run``, ``sweep``, ``push``) run Prefect flows: with ``PREFECT_API_URL`` unset a
temporary local server is started that dies with this process, also on ``kill -9``
(:mod:`flows.ephemeral_server`), otherwise they report to the server it names. Every command takes ``--set section.key=value``
overrides (repeatable), applied before the recipe is validated.

Exit codes: 0 success, 1 a stage failed, 2 bad recipe / bad input / usage.

Output: stdout carries only the command's result (JSON; YAML for ``validate``), so
``orpo run RECIPE | python -c 'import json,sys; json.load(sys.stdin)'`` works. While a
command runs, everything else written to stdout (transformers' log dicts, tqdm,
Prefect, subprocesses) goes to stderr. Messages on stderr are not hard-wrapped.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(add_completion=False, no_args_is_help=True, help="ORPO alignment pipeline (Prefect-orchestrated).")
# soft_wrap: no hard line breaks at 80 columns when stderr is a file or a pipe (the terminal wraps itself)
console = Console(stderr=True, soft_wrap=True)
_result_stream = None  # where the result goes while stdout is routed to stderr (see _route_stdout)

RecipeArg = typer.Argument(..., help="recipe YAML file, e.g. recipes/quickstart.yaml")
SetOpt = typer.Option(None, "--set", "-s", help="override, section.key=value (repeatable)")


@app.callback()
def _route_stdout(ctx: typer.Context) -> None:
    """Send all stdout output to stderr while a command runs; keep stdout for its result."""
    global _result_stream
    try:
        real_fd = sys.stdout.fileno() == 1
    except (AttributeError, OSError, ValueError):  # in-process runners (typer.testing.CliRunner)
        real_fd = False
    if real_fd:  # redirect file descriptor 1 itself, so subprocesses and C code follow
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(2, 1)
        _result_stream = os.fdopen(os.dup(saved), "w", encoding="utf-8")

        def restore() -> None:
            global _result_stream
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            if _result_stream is not None:
                _result_stream.close()
            _result_stream = None

    else:
        _result_stream, original = sys.stdout, sys.stdout
        sys.stdout = sys.stderr

        def restore() -> None:
            global _result_stream
            sys.stdout = original
            _result_stream = None

    ctx.call_on_close(restore)


def _print_result(text: str) -> None:
    """Write the command's result to the real stdout (see :func:`_route_stdout`)."""
    out = _result_stream or sys.stdout
    out.write(text + "\n")
    out.flush()


def _setup_env() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    # the temporary server's telemetry heartbeat fights the pipeline for the SQLite lock; no network anyway
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect gives its temporary server 20 s to start: not enough on a busy machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(recipe: str, overrides: Optional[list[str]]):
    from orpo_core.config import RecipeError, load_recipe

    try:
        r = load_recipe(recipe, overrides or [])
    except RecipeError as e:
        _bad_input(e)
    console.print(f"run folder: {escape(str(r.out_dir))}")  # output_dir resolved (absolute)
    return r


def _bad_input(e: BaseException) -> NoReturn:
    """End the command with exit code 2 (bad input), the error's text printed."""
    console.print(f"[red]error:[/red] {escape(str(e))}")
    raise typer.Exit(2) from None


def _run_flow(flow_fn, free: tuple[Path, ...] = (), **params) -> None:
    """Run one Prefect flow and print its result as JSON.

    Without ``PREFECT_API_URL`` a temporary server is started first (it dies with this
    process). Each folder in ``free`` is checked for a live run lock before the server starts.
    Errors end the command through :func:`_fail` (exit 2 for bad input, 1 otherwise).
    """
    from flows.ephemeral_server import start_ephemeral_server

    try:
        for folder in free:
            _ensure_free(folder)
        start_ephemeral_server()
        result = flow_fn(**params)
    except Exception as e:  # noqa: BLE001 - reported with exit code
        _fail(e)
    _print_json(result)


def _fail(e: BaseException) -> None:
    from orpo_core.config import RecipeError

    try:
        from orpo_core.data.errors import DataError
    except ImportError:  # pragma: no cover
        DataError = RecipeError  # type: ignore
    bad_input: tuple[type[BaseException], ...] = (RecipeError, DataError, FileNotFoundError)
    try:
        from orpo_core.publish.hub import HubError

        bad_input += (HubError,)
    except ImportError:  # pragma: no cover
        pass
    try:
        from orpo_core.evaluation.errors import EvalInputError
        from orpo_core.models.sources import ModelSourceError
        from orpo_core.publish.gguf import GGUFExportError

        bad_input += (EvalInputError, ModelSourceError, GGUFExportError)
    except ImportError:  # pragma: no cover
        pass
    code = 2 if isinstance(e, bad_input) else 1
    console.print(f"[red]error:[/red] {type(e).__name__}: {escape(str(e))}")
    raise typer.Exit(code) from None


def _ensure_free(run_dir: Path) -> None:
    """Raise RunFolderBusy at once when a live process holds ``run_dir`` (:func:`orpo_core.runs.lock.ensure_free`)."""
    from orpo_core.runs.lock import ensure_free

    ensure_free(run_dir)


def _print_json(obj) -> None:
    _print_result(json.dumps(obj, indent=2, default=str))


@app.command()
def validate(recipe: str = RecipeArg, set_: Optional[list[str]] = SetOpt) -> None:
    """Validate a recipe and print it fully resolved (defaults filled in)."""
    r = _load(recipe, set_)
    _print_result(r.to_yaml())


@app.command()
def prep(
    recipe: str = RecipeArg,
    set_: Optional[list[str]] = SetOpt,
    on_error: Optional[str] = typer.Option(None, "--on-error", help="raise (default) or skip bad rows, counted in stats.json"),
    tokenize: bool = typer.Option(True, "--tokenize/--no-tokenize", help="tokenize when the recipe names a model"),
) -> None:
    """Load, normalize, binarize, clean and split the data to Parquet, then tokenize (an ``onpolicy``
    source first runs the generate stage: the model answers, its failing answers are paired with their repair)."""
    _setup_env()
    overrides = list(set_ or [])
    if on_error:
        overrides.append(f"data.on_error={on_error}")
    r = _load(recipe, overrides)
    from orpo_core.data.prepare import prepare_dataset
    from orpo_core.runs.lock import run_folder_lock

    out = r.out_dir
    try:
        # not while another command (an `orpo run` training on this data, another prep) uses the folder
        with run_folder_lock(out):
            if tokenize and r.model is not None:
                from orpo_core.data.context_length import check_max_length

                check_max_length(r)  # data.max_length vs the model's context, before any data is written
            from orpo_core.data.onpolicy import generate_onpolicy, onpolicy_source

            if onpolicy_source(r) is not None:  # the generate stage first (its pairs feed prepare)
                generate_onpolicy(r, out / "onpolicy")
                console.print(f"[green]onpolicy[/green] -> {out / 'onpolicy'}")
            stats = prepare_dataset(r, out / "data")
            console.print(f"[green]data[/green] -> {out / 'data'}")
            if tokenize and r.model is not None:
                from orpo_core.data.tokenize import tokenize_dataset

                stats = tokenize_dataset(r, out / "data", out / "tokenized")
                console.print(f"[green]tokenized[/green] -> {out / 'tokenized'}")
    except Exception as e:  # noqa: BLE001 - reported with exit code
        _fail(e)
    _print_json(stats)


@app.command()
def train(
    recipe: str = RecipeArg,
    set_: Optional[list[str]] = SetOpt,
    resume: bool = typer.Option(
        True, "--resume/--no-resume", help="continue from the latest checkpoint of this configuration (others are removed)"
    ),
) -> None:
    """Train with ORPO from the tokenized Parquet (run `orpo prep` first)."""
    _setup_env()
    r = _load(recipe, set_)
    from orpo_core.runs.cache import stage_base_key
    from orpo_core.runs.lock import run_folder_lock
    from orpo_core.runs.resume import resume_decision, training_marker
    from orpo_core.training.run import run_training

    out = r.out_dir
    try:
        r.require_model()
        with run_folder_lock(out):  # not while an `orpo run` trains in the same folder
            # the train task's decision: checkpoints of this configuration resume, others are removed
            inputs = {"recipe": r.to_dict(), "tokenized_dir": str(out / "tokenized"), "out_dir": str(out / "train")}
            base_key = stage_base_key("train", inputs)
            resumed = resume_decision(out / "train", base_key) and resume
            with training_marker(out / "train", base_key):
                metrics = run_training(r, out / "tokenized", out / "train", resume=resumed)
    except Exception as e:  # noqa: BLE001
        _fail(e)
    console.print(f"[green]model[/green] -> {out / 'train' / 'model'}")
    _print_json(metrics)


@app.command("eval")
def eval_(
    recipe: str = RecipeArg,
    set_: Optional[list[str]] = SetOpt,
    model: Optional[str] = typer.Option(
        None,
        "--model",
        help="model to evaluate: a folder, a .gguf file or a packaged model name (default: the run's trained model); "
        "works without a prepared run (the model's own tokenizer, what needs no prepared data)",
    ),
    base: bool = typer.Option(True, "--base/--no-base", help="also evaluate the base model and report deltas"),
    out_name: str = typer.Option(
        "eval", "--out", help="folder under the run folder for eval.json / eval.md (e.g. eval-benchmarks, to keep the "
        "pipeline's eval/ as it is)"
    ),
) -> None:
    """Evaluate a model: preference accuracy, perplexity, lm-eval tasks; writes eval.json and eval.md.

    With ``--model`` on a run that was never prepared, the model's own tokenizer and chat
    template are used, only what needs no prepared data runs (corpus perplexity, lm-eval tasks,
    fixed prompts) and eval.md lists what was skipped. A model evaluated alone (``--no-base``, or
    the recipe's base model itself) is called "model" in eval.md, not "trained".
    """
    _setup_env()
    r = _load(recipe, set_)
    if not out_name or Path(out_name).name != out_name or out_name in (".", "..", "data", "tokenized", "train", "onpolicy"):
        _bad_input(ValueError(f"--out {out_name!r}: give a new folder name under the run folder (not a path, not a stage folder)"))
    from orpo_core.evaluation import run_evaluation
    from orpo_core.models.sources import resolve_model_source
    from orpo_core.runs.lock import run_folder_lock

    out = r.out_dir
    trained_dir = out / "train" / "model"
    log_history = out / "train" / "log_history.json"
    no_model = FileNotFoundError(
        f"no trained model in {trained_dir}: run `orpo train RECIPE` first, or evaluate a model "
        "on its own with `orpo eval RECIPE --model PATH` (folder, .gguf or packaged name)"
    )
    try:
        mcfg = r.require_model()
        _ensure_free(out)  # a live holder (a run still training) is named first
        if not model and not trained_dir.is_dir():
            raise no_model  # before the lock: nothing is created
        # writes <run>/eval and reads data + model of one version: not while a prep / run rewrites them
        with run_folder_lock(out):
            if model:
                given = mcfg.model_copy(update={"name_or_path": model, "gguf_file": None, "revision": None})
                model_dir = Path(resolve_model_source(given, out, seed=r.seed).path)
            else:
                model_dir = trained_dir
                if not trained_dir.is_dir():  # removed while waiting for the lock
                    raise no_model
            is_trained = model_dir.expanduser().resolve() == trained_dir.resolve()
            if not base:
                r.eval.compare_base = False  # run_evaluation derives the base model from the recipe otherwise
            label = "model" if (model and not is_trained and not r.eval.compare_base) else None
            result = run_evaluation(
                r,
                model_dir,
                out / "tokenized",
                out / out_name,
                log_history=log_history if (is_trained and log_history.is_file()) else None,
                allow_unprepared=bool(model),
                model_label=label,
            )
    except Exception as e:  # noqa: BLE001
        _fail(e)
    _print_json(result.get("summary", result) if isinstance(result, dict) else result)
    skipped = result.get("skipped") if isinstance(result, dict) else None
    for item in skipped or []:
        console.print(f"[yellow]skipped[/yellow]: {item}")
    console.print(f"[green]eval[/green] -> {out / out_name / 'eval.md'}")


@app.command()
def run(
    recipe: str = RecipeArg,
    set_: Optional[list[str]] = SetOpt,
    push: Optional[bool] = typer.Option(None, "--push/--no-push", help="upload to the Hub (default: recipe hub.push)"),
) -> None:
    """Run the whole pipeline as a Prefect flow: prepare -> tokenize -> train -> evaluate -> push."""
    _setup_env()
    r = _load(recipe, set_)  # validate before starting Prefect
    from flows.pipeline import orpo_pipeline

    # a busy folder fails at once, before a server starts (the flow takes the lock itself)
    _run_flow(orpo_pipeline, (r.out_dir,), recipe=recipe, overrides=list(set_ or []), push=push)


def parse_grid(grid: list[str]) -> dict[str, list]:
    """Parse ``--grid key=v1,v2`` options into ``{key: [v1, v2]}`` (values parsed as YAML scalars).

    Raises:
        typer.BadParameter: an entry without ``=`` or without values.
    """
    import yaml

    out: dict[str, list] = {}
    for g in grid:
        if "=" not in g:
            raise typer.BadParameter(f"--grid {g!r} must look like section.key=v1,v2")
        k, v = g.split("=", 1)
        values = [yaml.safe_load(x) for x in v.split(",") if x.strip() != ""]
        if not values:
            raise typer.BadParameter(f"--grid {g!r} has no values")
        out[k.strip()] = values
    return out


@app.command()
def sweep(
    recipe: str = RecipeArg,
    grid: list[str] = typer.Option(..., "--grid", "-g", help="section.key=v1,v2 (repeatable; cartesian product)"),
    set_: Optional[list[str]] = SetOpt,
    fan_out: bool = typer.Option(
        False, "--fan-out", help="run each point as a flow run of the pipeline deployment "
        "($ORPO_PIPELINE_DEPLOYMENT, default orpo-pipeline/orpo-pipeline-gpu) on its work pool's workers",
    ),
) -> None:
    """Ablation sweep: train + evaluate each grid point, sharing the cached data stages."""
    _setup_env()
    r = _load(recipe, set_)
    g = parse_grid(grid)
    from orpo_core.config import RecipeError, check_no_secrets

    try:  # grid values become flow parameters too
        check_no_secrets([f"{k}={v}" for k, vs in g.items() for v in vs])
    except RecipeError as e:
        _bad_input(e)
    from orpo_core.config import apply_overrides  # noqa: F401 - validation of each point happens in the flow
    from flows.sweep import ablation_sweep

    # the points share <run>/data and <run>/tokenized unless the grid changes them (fan-out)
    free = (r.out_dir / "sweep",) if fan_out else (r.out_dir, r.out_dir / "sweep")
    _run_flow(ablation_sweep, free, recipe=recipe, grid=g, overrides=list(set_ or []), fan_out=fan_out)


@app.command()
def export(
    recipe: str = RecipeArg,
    gguf: str = typer.Option(..., "--gguf", help="GGUF types, comma-separated: f32, f16, q8_0 (e.g. f16,q8_0)"),
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Write the trained model as GGUF files for llama.cpp / Ollama into <run>/export (cached Prefect task)."""
    _setup_env()
    _load(recipe, set_)
    from orpo_core.publish.gguf import GGUFExportError, parse_quantizations

    try:
        qs = parse_quantizations(gguf)
    except GGUFExportError as e:
        _bad_input(e)
    from flows.pipeline import export_flow

    _run_flow(export_flow, recipe=recipe, quantizations=qs, overrides=list(set_ or []))


@app.command()
def push(
    recipe: str = RecipeArg,
    dry_run: Optional[bool] = typer.Option(None, "--dry-run/--no-dry-run", help="write the folder only (default: not hub.push)"),
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Publish the trained model, tokenizer and model card to the Hugging Face Hub (token from HF_TOKEN)."""
    _setup_env()
    r = _load(recipe, set_)
    if dry_run is False or (dry_run is None and r.hub.push):
        from orpo_core.publish.hub import HubError, refuse_offline_upload

        try:
            refuse_offline_upload()  # before a server starts or a folder is built: nothing is uploaded
        except HubError as e:
            _fail(e)
    from flows.pipeline import push_flow

    _run_flow(push_flow, (r.out_dir,), recipe=recipe, overrides=list(set_ or []), dry_run=dry_run)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

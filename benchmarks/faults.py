"""Fault scenarios of issue 22 run against the real CLI, printed as the README's reliability table.

Each scenario runs ``python -m flows.cli`` (the ``orpo`` command) in its own process group on a
tiny offline recipe (random-init model, char tokenizer, synthetic arithmetic data) in a temp
folder, injects the fault and checks the outcome:

* ``kill9:<stage>`` (prepare, tokenize, train, evaluate): ``orpo run`` gets SIGKILL (whole process
  group, its temporary Prefect server included) while that stage writes, then the same command is
  rerun: it must exit 0 with no ``.tmp-`` / ``.old-`` folder left, an ``eval.json`` scored on
  the test split that ``tokenized/`` holds, and the stages before the killed one ``Cached``.
* ``offline-push``, ``escape-run-name``, ``max-length``, ``inf-lr``, ``token-set``: one
  command each, expected to be refused (exit 2) with one error line, writing nothing.

The concurrency faults (prep / sweep / eval / push during a run, two preps, kill -9 while
tokenizing) and the Prefect server killed mid-training are reproduced by the tests
``tests/test_run_integrity.py`` and ``tests/test_progress_sender.py`` (see README, Reliability);
``--tests`` runs them too and adds their rows.

    PYTHONPATH=$PWD nice -n 5 .venv/bin/python benchmarks/faults.py            # all CLI scenarios
    PYTHONPATH=$PWD nice -n 5 .venv/bin/python benchmarks/faults.py kill9:train offline-push
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

TESTS = {
    "prep during run / sweep during run / eval during run / push during run":
        "tests/test_run_integrity.py::test_commands_during_a_run_fail_fast_naming_the_holder",
    "two preps at once / eval during prep": "tests/test_run_integrity.py::test_two_preps_and_an_eval_during_a_prep",
    "kill -9 while tokenizing, rerun": "tests/test_run_integrity.py::test_kill_9_during_tokenize_then_rerun_leaves_no_staging",
    "Prefect server killed mid-training, restarted": "tests/test_progress_sender.py::test_step_time_with_the_server_killed_and_restarted",
}


def recipe(folder: Path, **over) -> Path:
    """A tiny offline recipe under ``folder`` (run folder ``folder/run``); ``over`` replaces sections."""
    d = {
        "run_name": "faults",
        "output_dir": str(folder / "run"),
        "seed": 5,
        "model": {"name_or_path": "tiny", "dtype": "float32",
                  "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                           "num_key_value_heads": 2, "max_position_embeddings": 128, "tokenizer": "char"}},
        "data": {"sources": [{"synthetic": {"task": "arithmetic", "n_rows": 20000}}], "test_size": 0.02, "max_length": 64,
                 "max_prompt_length": 40},
        "train": {"learning_rate": 1e-3, "max_steps": 60, "per_device_train_batch_size": 8, "logging_steps": 10,
                  "save_steps": 10, "eval_steps": 1000},
        "eval": {"bootstrap_samples": 20, "max_new_tokens": 4, "prompts": ["What is 1 + 2?"], "tasks": []},
        "hub": {"repo_id": "someone/faults-tiny", "push": False},
    }
    d.update(over)
    p = folder / "recipe.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _env(folder: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(folder / "prefect-home"), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", NO_COLOR="1",
               COLUMNS="300", TOKENIZERS_PARALLELISM="false", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.update(extra)
    return env


def _cli(folder: Path, *args: str, timeout_s: float = 900, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "flows.cli", *args], cwd=ROOT, env=_env(folder, **env), capture_output=True, text=True,
                          timeout=timeout_s)


def _leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if ".tmp-" in p.name or ".old-" in p.name) if run.is_dir() else []


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


# --------------------------------------------------------------------------- kill -9 in a stage
def _stage_marker(run: Path, stage: str) -> bool:
    """Whether ``stage`` is writing now (its staging folder / first checkpoint / output folder exists)."""
    if stage == "prepare":
        return any(run.glob(".data.tmp-*"))
    if stage == "tokenize":
        return any(run.glob(".tokenized.tmp-*"))
    if stage == "train":
        return any((run / "train").glob("**/checkpoint-*/trainer_state.json"))
    if stage == "evaluate":
        return (run / "eval").is_dir()
    raise ValueError(stage)


def kill9(stage: str) -> dict:
    """SIGKILL ``orpo run`` while ``stage`` writes, rerun, check the outcome (see module docstring)."""
    folder = Path(tempfile.mkdtemp(prefix=f"orpo-fault-{stage}-"))
    rec = recipe(folder)
    run = folder / "run"
    p = subprocess.Popen([PY, "-m", "flows.cli", "run", str(rec)], cwd=ROOT, env=_env(folder), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.monotonic()
    hit = False
    try:
        while time.monotonic() - t0 < 900 and p.poll() is None:
            if run.is_dir() and _stage_marker(run, stage):
                hit = True
                break
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    left_after_kill = _leftovers(run)
    t1 = time.monotonic()
    res = _cli(folder, "run", str(rec))
    rerun_s = time.monotonic() - t1
    row = {"fault": f"kill -9 of `orpo run` during {stage}", "hit": hit, "left_after_kill": left_after_kill,
           "rerun_exit": res.returncode, "rerun_s": round(rerun_s, 1), "left_after_rerun": _leftovers(run)}
    ok = hit and res.returncode == 0 and not row["left_after_rerun"]
    if res.returncode == 0:
        out = json.loads(res.stdout)
        row["stages"] = out.get("stages")
        ev = json.loads((run / "eval" / "eval.json").read_text())
        tok = json.loads((run / "tokenized" / "stats.json").read_text())
        n_test = tok["tokenization"]["test"]["rows_out"]
        n_eval = _n_pairs(ev)
        row["eval_pairs"], row["tokenized_test_rows"] = n_eval, n_test
        ok = ok and n_eval == n_test
        resumed = "resum" in res.stderr.lower() and stage == "train"
        row["resumed"] = resumed
    else:
        row["error"] = _last_line(res.stderr)
    row["outcome"] = (
        f"rerun exit {res.returncode} in {rerun_s:.0f} s; stages {row.get('stages')}; "
        f"left after kill {len(left_after_kill)} staging folder(s), after rerun {len(row['left_after_rerun'])}; "
        f"eval on {row.get('eval_pairs')} of {row.get('tokenized_test_rows')} test pairs"
    )
    row["ok"] = ok
    return row


def _n_pairs(ev: dict) -> int | None:
    """Number of held-out pairs the evaluation scored (``settings.n_pairs`` of eval.json)."""
    return (ev.get("settings") or {}).get("n_pairs")


# --------------------------------------------------------------------------- refusals
REFUSALS = {
    "offline-push": ("HF_HUB_OFFLINE=1 `orpo push --no-dry-run`", ["push", "{recipe}", "--no-dry-run"], {"HF_HUB_OFFLINE": "1"}),
    "escape-run-name": ("`--set run_name=../../escaped`", ["prep", "{recipe}", "--set", "run_name=../../escaped",
                                                          "--set", "output_dir=runs/${{run_name}}"], {}),
    "max-length": ("`--set data.max_length=1.0e+11` (model: 128 positions)", ["prep", "{recipe}", "--set", "data.max_length=1.0e+11"], {}),
    "inf-lr": ("`--set train.learning_rate=.inf`", ["train", "{recipe}", "--set", "train.learning_rate=.inf"], {}),
    "token-set": ("`--set hub.commit_message=hf_…` (a token-looking value)",
                  ["run", "{recipe}", "--set", "hub.commit_message=hf_" + "T0k3n" * 7], {}),
}


def refusal(name: str) -> dict:
    """Run one refused command; ok when it exits 2 with one error line and writes nothing."""
    what, args, env = REFUSALS[name]
    folder = Path(tempfile.mkdtemp(prefix=f"orpo-fault-{name}-"))
    rec = recipe(folder)
    args = [a.replace("{recipe}", str(rec)).replace("{{", "{").replace("}}", "}") for a in args]
    t0 = time.monotonic()
    res = _cli(folder, *args, **env)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:") or ln.startswith("  ")]
    wrote = [p.name for p in (folder / "run").iterdir()] if (folder / "run").is_dir() else []
    escaped = (ROOT / "escaped").exists()
    msg = _last_line("\n".join(errors)) if errors else _last_line(res.stderr)
    return {"fault": what, "exit": res.returncode, "s": round(time.monotonic() - t0, 1), "message": msg[:300],
            "wrote": wrote, "ok": res.returncode == 2 and not escaped and not any(w in ("data", "tokenized", "hub") for w in wrote),
            "outcome": f"exit {res.returncode} in {time.monotonic() - t0:.0f} s: {msg[:200]}"}


def run_tests() -> list[dict]:
    """Run the concurrency / server tests (pytest) and report each as a row."""
    rows = []
    for what, node in TESTS.items():
        t0 = time.monotonic()
        res = subprocess.run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", node], cwd=ROOT, env=_env(Path(tempfile.mkdtemp())),
                             capture_output=True, text=True, timeout=900)
        rows.append({"fault": what, "ok": res.returncode == 0, "outcome": f"{node}: {_last_line(res.stdout)}",
                     "s": round(time.monotonic() - t0, 1)})
    return rows


def main() -> None:  # pragma: no cover - CLI
    ap = argparse.ArgumentParser(description="issue 22 fault scenarios")
    ap.add_argument("scenarios", nargs="*", help="kill9:<stage> or a refusal name (default: all)")
    ap.add_argument("--tests", action="store_true", help="also run the concurrency / server tests")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    names = a.scenarios or [f"kill9:{s}" for s in ("prepare", "tokenize", "train", "evaluate")] + list(REFUSALS)
    rows = []
    for n in names:
        row = kill9(n.split(":", 1)[1]) if n.startswith("kill9:") else refusal(n)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    if a.tests:
        rows += run_tests()
    if a.json:
        print(json.dumps(rows, indent=2))
        return
    print("| fault | outcome | ok |\n|---|---|---|")
    for r in rows:
        print(f"| {r['fault']} | {r['outcome'].replace('|', '/')} | {'yes' if r['ok'] else 'NO'} |")
    print(f"\nload average {os.getloadavg()}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    main()

"""The layers hold at run time too: the stage commands of the CLI import no Prefect and no tasks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, sys
from typer.testing import CliRunner
from flows.cli import app
res = CliRunner().invoke(app, sys.argv[1:])
loaded = sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in ('prefect', 'tasks')})
print(json.dumps({"exit": res.exit_code, "loaded": loaded}))
"""


def _probe(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_orpo_train_imports_neither_prefect_nor_tasks(tmp_path):
    # fails at once (nothing prepared), after the command has imported what it uses
    r = _probe("train", "recipes/quickstart.yaml", "--set", f"output_dir={tmp_path / 'run'}")
    assert r["exit"] == 1 and r["loaded"] == []  # TrainInputError: no tokenized folder


def test_orpo_prep_imports_neither_prefect_nor_tasks(tmp_path):
    r = _probe("prep", "recipes/quickstart.yaml", "--no-tokenize", "--set", f"output_dir={tmp_path / 'run'}")
    assert r["exit"] == 0 and r["loaded"] == []
    assert (tmp_path / "run" / "data" / "train.parquet").is_file()

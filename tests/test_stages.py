"""Each stage's cache key is defined once (orpo_core.stages.STAGES: fields + code paths) and
follows exactly the code under the stage's folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import orpo_core
import orpo_core.runs.cache as cache
from orpo_core.stages import STAGES, fields_hash

ALL = tuple(STAGES)
# the folder each stage owns alone (tokenize owns the single module data/tokenize.py)
OWN = {"prepare": "data", "train": "training", "evaluate": "evaluation", "export": "publish"}


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A copy of the real orpo_core package that the cache keys read instead of the installed one."""
    root = tmp_path / "orpo_core"
    shutil.copytree(Path(orpo_core.__file__).parent, root, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(cache, "_ORPO_ROOT", root)
    return root


def _keys():
    return {s: cache.code_fingerprint(s) for s in ALL}


@pytest.mark.parametrize("stage", sorted(OWN))
def test_adding_a_module_changes_that_stage_key_only(tree, stage):
    before = _keys()
    (tree / OWN[stage] / "_probe_new_module.py").write_text("X = 1\n")
    after = _keys()
    changed = {s for s in ALL if after[s] != before[s]}
    assert changed == {stage}


@pytest.mark.parametrize("stage", sorted(OWN))
def test_moving_a_module_within_the_stage_folder_changes_that_stage_key_only(tree, stage):
    own = tree / OWN[stage]
    victim = next(p for p in sorted(own.rglob("*.py")) if p.name != "__init__.py" and p.relative_to(tree).as_posix() not in _shared_files(stage))
    before = _keys()
    sub = own / "_moved"
    sub.mkdir()
    victim.rename(sub / victim.name)  # same content, another place
    after = _keys()
    assert {s for s in ALL if after[s] != before[s]} == {stage}


def _shared_files(stage: str) -> set[str]:
    """Files under ``stage``'s own folder that another stage names explicitly."""
    own = OWN[stage]
    return {c for other in ALL if other != stage for c in STAGES[other].code if c.startswith(own + "/")}


def test_tokenize_module_changes_its_readers_not_prepare_or_evaluate(tree):
    before = _keys()
    p = tree / "data" / "tokenize.py"
    p.write_text(p.read_text() + "\n# edited\n")
    after = _keys()
    assert {s for s in ALL if after[s] != before[s]} == {"tokenize", "train", "export"}  # export reads tokenizer files through it


def test_code_of_no_stage_changes_no_key(tree):
    before = _keys()
    (tree / "runs" / "_probe.py").write_text("Z = 3\n")
    assert _keys() == before


def test_common_code_changes_every_key(tree):
    before = _keys()
    (tree / "config.py").write_text((tree / "config.py").read_text() + "\n# edited\n")
    after = _keys()
    assert all(after[s] != before[s] for s in ALL)


def test_every_code_path_of_every_stage_exists():
    root = Path(orpo_core.__file__).parent
    for st in STAGES.values():
        for rel in (*st.code, *st.exclude):
            assert (root / rel).exists(), f"stage {st.name} names {rel}, which is not in orpo_core"


def test_fields_hash_is_the_base_key_fields():
    r = {"seed": 1, "data": {"sources": [], "test_size": 0.1}, "orpo": {"beta": 0.1}}
    r2 = {**r, "orpo": {"beta": 0.2}}
    assert fields_hash(r, "prepare") == fields_hash(r2, "prepare")
    assert fields_hash(r, "train") != fields_hash(r2, "train")
    assert fields_hash(r, "evaluate") != fields_hash(r2, "evaluate")

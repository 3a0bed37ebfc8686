"""The documentation stays true to the tree: README.md is short and its commands are CI's, every
page of mkdocs.yml's nav exists (and every page is in the nav), and every repository path or
dotted module name written in backticks in README.md, docs/ or deploy/README.md exists.

The site itself is built by ``.ci/run`` (``mkdocs build --strict``); the last test builds it
here too and checks that mkdocstrings read the code statically (no project module imported)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 200

# top-level folders and files of the repository that a backticked path may start with
TOP = ("orpo_core/", "tasks/", "flows/", "benchmarks/", "recipes/", "tests/", "deploy/", "docs/", ".ci/")
TOP_FILES = ("prefect.yaml", "pyproject.toml", "constraints.txt", "mkdocs.yml", "README.md")
PACKAGES = ("orpo_core", "tasks", "flows")


def _doc_files() -> list[Path]:
    return [README, ROOT / "deploy" / "README.md", *sorted(DOCS.rglob("*.md"))]


def _code_spans(text: str) -> list[str]:
    """Inline code spans (`...`) outside fenced code blocks."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.findall(r"`([^`\n]+)`", text)


def _repo_paths(span: str) -> list[str]:
    """The repository paths in one code span: words starting with a top-level folder or file,
    without a ``:object`` / ``::test`` suffix or trailing punctuation."""
    out = []
    for word in span.split():
        word = word.strip("'\"(),;")
        if not (word.startswith(TOP) or word in TOP_FILES):
            continue
        if any(c in word for c in "<>{}…") or "=" in word:  # templates (`sweep/<point>/…`), assignments
            continue
        out.append(re.split(r"::?(?=[A-Za-z_])", word, maxsplit=1)[0].rstrip(".,:"))
    return out


def _dotted_names(span: str) -> list[str]:
    return [w for w in re.findall(r"[A-Za-z_][\w.]*", span) if w.split(".")[0] in PACKAGES and "." in w]


def _module_file(parts: list[str]) -> Path | None:
    base = ROOT.joinpath(*parts)
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _top_level_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def dotted_name_exists(name: str) -> bool:
    """``pkg.module[.attr[.attr]]``: the longest prefix that is a module file, then the next
    part a top-level name of it (class, function, assignment or import); deeper parts unchecked."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        path = _module_file(parts[:i])
        if path is not None:
            return i == len(parts) or parts[i] in _top_level_names(path)
    return False


def _nav_pages(nav) -> list[str]:
    pages: list[str] = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}); move reference text to docs/"


def test_readme_links_exist():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text(encoding="utf-8"))
    local = [link for link in links if "://" not in link]
    assert len(local) >= 10, local  # the page map
    assert [link for link in local if not (ROOT / link).is_file()] == []


def test_readme_commands_are_what_ci_runs():
    """The README's two one-line commands: the first runs the main job; the second installs exactly
    as .ci/run does (its pip commands, less -q) and runs CI's pytest command. docs/index.md shows
    the same main-job command."""
    main_cmd, test_cmd = (b.strip() for b in _bash_blocks(README.read_text(encoding="utf-8"))[:2])
    assert main_cmd.endswith("&& orpo run recipes/smollm2-instructions.yaml")
    assert (ROOT / "recipes" / "smollm2-instructions.yaml").is_file()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    ci_cmds = [re.sub(r"\s+-q\b", "", line).strip() for line in ci.splitlines() if line.startswith(("pip install", "python -m pytest"))]
    assert len(ci_cmds) == 3, ci_cmds
    readme_steps = [s.strip() for s in test_cmd.split("&&")]
    for cmd in ci_cmds[:2]:
        assert cmd in readme_steps, (cmd, readme_steps)
        assert cmd in [s.strip() for s in main_cmd.split("&&")]
    assert readme_steps[-1] == next(line.strip() for line in ci.splitlines() if line.startswith("python -m pytest"))
    assert main_cmd in _bash_blocks((DOCS / "index.md").read_text(encoding="utf-8"))[0]


def test_every_nav_page_exists_and_every_page_is_in_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    docs_dir = ROOT / config.get("docs_dir", "docs")
    pages = _nav_pages(config["nav"])
    missing = [p for p in pages if not (docs_dir / p).is_file()]
    assert not missing, f"mkdocs.yml nav lists missing pages: {missing}"
    on_disk = {p.relative_to(docs_dir).as_posix() for p in docs_dir.rglob("*.md")}
    assert on_disk - set(pages) == set(), f"pages not in mkdocs.yml nav: {sorted(on_disk - set(pages))}"
    assert len(pages) == len(set(pages))


def test_backticked_repo_paths_exist():
    stale = []
    checked = 0
    for doc in _doc_files():
        for span in _code_spans(doc.read_text(encoding="utf-8")):
            for path in _repo_paths(span):
                checked += 1
                if "*" in path:
                    ok = any(ROOT.glob(path))
                else:
                    ok = (ROOT / path).exists()
                if not ok:
                    stale.append(f"{doc.relative_to(ROOT)}: `{path}`")
    assert checked > 50  # the check saw the docs' paths at all
    assert not stale, "paths in backticks that do not exist:\n" + "\n".join(stale)


def test_backticked_module_names_exist():
    stale = []
    checked = 0
    for doc in _doc_files():
        text = doc.read_text(encoding="utf-8")
        names = [n for span in _code_spans(text) for n in _dotted_names(span)]
        names += re.findall(r"^::: *([\w.]+)", text, flags=re.M)  # mkdocstrings' API pages
        for name in names:
            checked += 1
            if not dotted_name_exists(name):
                stale.append(f"{doc.relative_to(ROOT)}: `{name}`")
    assert checked > 30
    assert not stale, "module names in backticks that do not exist:\n" + "\n".join(stale)


def test_path_checks_catch_stale_names():
    """The checks above would fail on the names that the layout change retired."""
    assert _repo_paths("orpo_core/fused.py, flows/pipeline.py:orpo_pipeline") == ["orpo_core/fused.py", "flows/pipeline.py"]
    assert not (ROOT / "orpo_core/fused.py").exists() and (ROOT / "orpo_core/training/fused.py").is_file()
    assert _repo_paths("tests/test_prefect_server.py::test_scheduler_creates_retrain_runs") == ["tests/test_prefect_server.py"]
    assert _repo_paths("sweep/<point>/…") == [] and _repo_paths("data/{train,test}.parquet") == []
    assert dotted_name_exists("orpo_core.training.loss")
    assert dotted_name_exists("orpo_core.evaluation.results.extract_metrics")
    assert dotted_name_exists("flows.pipeline.orpo_pipeline")
    assert not dotted_name_exists("orpo_core.model_card")
    assert not dotted_name_exists("tasks.common.stage_run")
    assert not dotted_name_exists("orpo_core.evaluation.results.no_such_function")


@pytest.mark.slow
def test_mkdocs_build_strict_reads_code_statically(tmp_path):
    """``mkdocs build --strict`` passes, and mkdocstrings imported none of the project's modules
    (nor torch or Prefect): the API pages come from griffe's static parse."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    probe = (
        "import sys, atexit\n"
        "atexit.register(lambda: print('IMPORTED', sorted(m for m in sys.modules if m.split('.')[0] in "
        "('orpo_core', 'tasks', 'flows', 'torch', 'prefect', 'transformers'))))\n"
        "from mkdocs.__main__ import cli\n"
        f"cli(['build', '--strict', '-q', '-d', {str(tmp_path / 'site')!r}])\n"
    )
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "IMPORTED []" in r.stdout, r.stdout
    assert (tmp_path / "site" / "reference" / "training" / "index.html").is_file()
    page = (tmp_path / "site" / "reference" / "training" / "index.html").read_text(encoding="utf-8")
    assert "orpo_loss_from_logits" in page and ":func:<code" not in page

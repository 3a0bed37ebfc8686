"""Data robustness (issue 12): the bad-input corpus in tests/fixtures/bad_input/.

Every case gives a named error (file, line or row, field, reason) and writes nothing,
or, with ``on_error: skip``, a counted skip of only the offending rows. Formats are
detected per file and every row is checked against its file's format.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orpo_core.config import RecipeError, recipe_from_dict
from orpo_core.data.errors import DataError
from orpo_core.data.prepare import prepare_dataset
from orpo_core.data.schema import read_pairs

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).parent / "fixtures" / "bad_input"


def recipe_for(path: Path, on_error: str = "raise", **src):
    return recipe_from_dict({"data": {"sources": [{"path": str(path), **src}], "on_error": on_error, "test_size": 0}})


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def accounted(stats) -> bool:
    return stats["rows_read"] + stats["pairs_added_by_binarize"] == stats["rows_kept"] + stats["dropped_total"]


# --------------------------------------------------------------------------- row-level cases
# (file, reason, location, field, rows read, rows kept under skip)
ROW_CASES = [
    ("stray_ratings_keys.jsonl", "foreign_keys", "line 7", "responses", 20, 19),
    ("stray_conversations_key.jsonl", "foreign_keys", "line 7", "conversations", 20, 19),
    ("stray_first_row.jsonl", "foreign_keys", "line 1", "responses", 20, 19),
    ("malformed_json.jsonl", "malformed_json", "line 2", "chosen", 3, 2),
    ("truncated.jsonl", "malformed_json", "line 3", "chosen", 3, 2),
    ("duplicate_key.jsonl", "duplicate_key", "line 2", "chosen", 3, 2),
    ("duplicate_nested_key.json", "duplicate_key", "row 1", "chosen[1].role", 3, 2),
    ("nan_score.jsonl", "bad_score", "line 2", "scores[0]", 3, 2),
    ("inf_score.jsonl", "bad_score", "line 2", "score_chosen", 3, 2),
    ("unknown_role.jsonl", "unknown_role", "line 2", "chosen[1].role", 3, 2),
    ("wrong_type.jsonl", "non_string", "line 2", "chosen", 3, 2),
    ("not_utf8.jsonl", "not_utf8", "line 2", "chosen", 3, 2),
    ("lone_surrogate.jsonl", "not_utf8", "line 2", "prompt", 3, 2),
    ("field_count.csv", "malformed_csv", "line 3", None, 3, 2),
]


@pytest.mark.parametrize("name,reason,where,field,read,kept", ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_row_case_raises_named_error_and_writes_nothing(tmp_path, name, reason, where, field, read, kept):
    path = CORPUS / name
    out = tmp_path / "run" / "data"
    with pytest.raises(DataError) as exc:
        prepare_dataset(recipe_for(path), out)
    err = exc.value
    assert err.reason == reason and not err.fatal
    assert (err.file, err.row, err.field) == (str(path), where, field), str(err)
    assert str(err).startswith(f"{path}: {where}: ")
    assert_nothing_written(out)


@pytest.mark.parametrize("name,reason,where,field,read,kept", ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_row_case_skip_drops_only_the_offending_row(tmp_path, name, reason, where, field, read, kept):
    path = CORPUS / name
    out = tmp_path / "run" / "data"
    stats = prepare_dataset(recipe_for(path, "skip"), out)
    assert (stats["rows_read"], stats["rows_kept"], stats["dropped"]) == (read, kept, {reason: 1})
    assert accounted(stats)
    assert any(f": {where}: " in m for m in stats["error_examples"][reason])
    rows = read_pairs(out / "train.parquet")
    assert len(rows) == kept


def test_stray_row_never_changes_the_file_format(tmp_path):
    """The 19 standard rows of a file with one ratings-looking row are read as standard, each pair
    from its own line (the old detector read the file as ratings and mixed prompts and answers)."""
    path = CORPUS / "stray_ratings_keys.jsonl"
    stats = prepare_dataset(recipe_for(path, "skip"), tmp_path / "data")
    entry = stats["sources"][str(path)]
    assert entry["format"] == "standard" and entry["formats"] == {str(path): "standard"}
    rows = read_pairs(tmp_path / "data" / "train.parquet")
    for r in rows:
        n = int(r["origin"].rsplit(":", 1)[1])
        assert r["prompt"][-1]["content"] == f"Question {n}?"
        assert r["chosen"] == [{"role": "assistant", "content": f"Good answer {n}."}]
        assert r["rejected"] == [{"role": "assistant", "content": f"Bad answer {n}."}]
    assert sorted(int(r["origin"].rsplit(":", 1)[1]) for r in rows) == [i for i in range(1, 21) if i != 7]
    msg = stats["error_examples"]["foreign_keys"][0]
    assert "'responses', 'scores'" in msg and "ratings format" in msg and "this file is standard" in msg


def test_malformed_json_column_is_the_parsers(tmp_path):
    path = CORPUS / "malformed_json.jsonl"
    bad_line = path.read_text().splitlines()[1]
    with pytest.raises(json.JSONDecodeError) as parser:
        json.loads(bad_line)
    assert parser.value.colno > 1
    with pytest.raises(DataError) as exc:
        prepare_dataset(recipe_for(path), tmp_path / "data")
    assert f"at column {parser.value.colno}: {parser.value.msg}" in str(exc.value)


def test_malformed_json_column_in_a_pretty_printed_json_file(tmp_path):
    path = tmp_path / "p.json"
    text = '[\n  {"prompt": "q1", "chosen": "a", "rejected": "b"},\n  {"prompt": "q2", "chosen": "a" "rejected": "b"}\n]\n'
    path.write_text(text)
    with pytest.raises(json.JSONDecodeError) as parser:
        json.loads(text)
    with pytest.raises(DataError) as exc:
        prepare_dataset(recipe_for(path, "skip"), tmp_path / "run" / "data")
    assert exc.value.fatal and exc.value.row == f"line {parser.value.lineno}" == "line 3"
    assert f"at column {parser.value.colno}: " in str(exc.value)


def test_long_line_is_read_whole(tmp_path):
    """A 4 MB line is one record, not a truncated or split one."""
    path = tmp_path / "long.jsonl"
    long = "x" * (4 << 20)
    path.write_text(
        json.dumps({"prompt": "q1", "chosen": long, "rejected": "short"}) + "\n"
        + json.dumps({"prompt": "q2", "chosen": "a", "rejected": "b"}) + "\n"
    )
    prepare_dataset(recipe_for(path), tmp_path / "data")
    rows = read_pairs(tmp_path / "data" / "train.parquet")
    assert [len(r["chosen"][0]["content"]) for r in rows] == [4 << 20, 1]


# --------------------------------------------------------------------------- whole-file cases: always fatal
# (file, reason, location, text in the message)
FATAL_CASES = [
    ("array_as_jsonl.jsonl", "malformed_json", "line 1", "one JSON array of 3 items spanning 5 lines"),
    ("array_one_line.jsonl", "malformed_json", "line 1", "one JSON array of 3 items on one line"),
    ("object_as_jsonl.jsonl", "malformed_json", "line 1", "one JSON object spanning"),
    ("unterminated_quote.csv", "malformed_csv", "line 3", "unterminated quoted field"),
    ("quote_closes_late.csv", "malformed_csv", "line 3", "runs from line 3 to line 4"),
    ("duplicate_header.csv", "malformed_csv", "line 1", "column 'chosen' appears twice"),
    ("misspelled_column.jsonl", "missing_column", "line 1", "did you mean 'rejectd'?"),
    ("empty.jsonl", "empty_file", None, "file is empty"),
]


@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize("name,reason,where,text", FATAL_CASES, ids=[c[0] for c in FATAL_CASES])
def test_whole_file_case_is_fatal(tmp_path, name, reason, where, text, on_error):
    path = CORPUS / name
    out = tmp_path / "run" / "data"
    with pytest.raises(DataError) as exc:
        prepare_dataset(recipe_for(path, on_error), out)
    err = exc.value
    assert err.fatal and err.reason == reason and err.file == str(path) and err.row == where, str(err)
    assert text in str(err)
    assert_nothing_written(out)


def test_jsonl_array_hint_says_rename_to_json(tmp_path):
    with pytest.raises(DataError, match=r"rename it to \.json"):
        prepare_dataset(recipe_for(CORPUS / "array_as_jsonl.jsonl"), tmp_path / "data")
    # and the same content as .json is fine
    renamed = tmp_path / "array.json"
    renamed.write_bytes((CORPUS / "array_as_jsonl.jsonl").read_bytes())
    stats = prepare_dataset(recipe_for(renamed), tmp_path / "data")
    assert stats["rows_kept"] == 3


def test_later_array_line_in_jsonl_stays_row_level(tmp_path):
    path = tmp_path / "p.jsonl"
    good = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
    path.write_text(good + "\n[1, 2]\n" + good.replace("q", "q3") + "\n")
    stats = prepare_dataset(recipe_for(path, "skip"), tmp_path / "data")
    assert stats["dropped"] == {"malformed_json": 1} and stats["rows_kept"] == 2


# --------------------------------------------------------------------------- files that are fine
@pytest.mark.parametrize("name", ["bom_crlf.jsonl", "bom_crlf.csv", "quoted_newline.csv"])
def test_bom_crlf_and_quoted_newlines_are_read_exactly(tmp_path, name):
    stats = prepare_dataset(recipe_for(CORPUS / name), tmp_path / "data")
    assert stats["rows_kept"] == 3 and stats["dropped_total"] == 0
    rows = read_pairs(tmp_path / "data" / "train.parquet")
    for r in rows:  # no BOM, no stray \r anywhere
        for m in r["prompt"] + r["chosen"] + r["rejected"]:
            assert "\ufeff" not in m["content"] and "\r" not in m["content"]
    if name == "quoted_newline.csv":
        assert rows[0]["prompt"][-1]["content"] == "Line one\nline two?"
        assert rows[0]["chosen"][0]["content"] == "Yes,\nboth."
        assert [r["origin"].rsplit(":", 1)[1] for r in rows] == ["0", "1", "2"]
    else:
        assert [r["prompt"][-1]["content"] for r in rows] == ["Question 1?", "Question 2?", "Question 3?"]


def test_mixed_folder_keeps_all_rows_with_a_format_per_file(tmp_path):
    folder = CORPUS / "mixed"
    for on_error in ("raise", "skip"):
        stats = prepare_dataset(recipe_for(folder, on_error), tmp_path / on_error)
        assert stats["rows_read"] == 40 and stats["rows_kept"] == 40 and stats["dropped_total"] == 0
        entry = stats["sources"][str(folder)]
        assert entry["format"] == "mixed"
        assert entry["formats"] == {
            str(folder / "conversational.parquet"): "conversational",
            str(folder / "ratings.json"): "ratings",
            str(folder / "standard.csv"): "standard",
            str(folder / "standard.jsonl"): "standard",
        }
    rows = read_pairs(tmp_path / "raise" / "train.parquet")
    by_file: dict[str, list] = {}
    for r in rows:
        by_file.setdefault(Path(r["origin"].rsplit(":", 1)[0]).name, []).append(r)
    assert {k: len(v) for k, v in by_file.items()} == {
        "conversational.parquet": 10,
        "ratings.json": 10,
        "standard.csv": 10,
        "standard.jsonl": 10,
    }
    rated = by_file["ratings.json"][3]
    assert rated["chosen"][0]["content"] == "best 3" and rated["rejected"][0]["content"] == "worst 3"
    assert (rated["score_chosen"], rated["score_rejected"]) == (9.0, 1.0)
    chat = by_file["conversational.parquet"][2]
    assert chat["prompt"] == [{"role": "user", "content": "Chat question 2?"}]
    assert chat["chosen"] == [{"role": "assistant", "content": "Helpful 2."}]


def test_stray_row_inside_a_mixed_folder_is_named_by_its_file(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    for f in (CORPUS / "mixed").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "stray.jsonl").write_bytes((CORPUS / "stray_conversations_key.jsonl").read_bytes())
    with pytest.raises(DataError) as exc:
        prepare_dataset(recipe_for(folder), tmp_path / "run" / "data")
    assert exc.value.file == str(folder / "stray.jsonl") and exc.value.row == "line 7"
    stats = prepare_dataset(recipe_for(folder, "skip"), tmp_path / "run" / "data")
    assert stats["rows_kept"] == 59 and stats["dropped"] == {"foreign_keys": 1}


def test_explicit_format_still_checks_rows(tmp_path):
    stats = prepare_dataset(
        recipe_for(CORPUS / "stray_ratings_keys.jsonl", "skip", format="standard"), tmp_path / "data"
    )
    assert stats["rows_kept"] == 19 and stats["dropped"] == {"foreign_keys": 1}


def test_standard_file_with_a_scores_column_on_every_row_is_not_foreign(tmp_path):
    """An extra column that alone fits no other format is an ordinary extra column."""
    path = tmp_path / "p.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b", "scores": [2, 1]}) + "\n" for i in range(3))
    )
    stats = prepare_dataset(recipe_for(path), tmp_path / "data")
    assert stats["rows_kept"] == 3


def test_ratings_file_with_a_pair_row_names_the_foreign_keys(tmp_path):
    path = tmp_path / "r.jsonl"
    rows = [{"prompt": f"q{i}", "responses": ["a", "b"], "scores": [2, 1]} for i in range(4)]
    rows[2] = {"prompt": "q2", "chosen": "a", "rejected": "b"}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as exc:
        prepare_dataset(recipe_for(path), tmp_path / "data")
    assert exc.value.reason == "foreign_keys" and exc.value.row == "line 3"
    assert "'chosen', 'rejected' belong to the standard/conversational/hh format" in str(exc.value)


def test_corpus_matches_its_generator(tmp_path):
    """The committed files are what make_corpus.py writes (Parquet checked by content)."""
    import pyarrow.parquet as pq

    subprocess.run([sys.executable, str(CORPUS / "make_corpus.py"), str(tmp_path)], check=True)
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(
        p.relative_to(CORPUS)
        for p in CORPUS.rglob("*")
        if p.is_file() and p.suffix != ".py" and not p.name.startswith(".")
    )
    assert made == committed
    for rel in made:
        if rel.suffix == ".parquet":
            assert pq.read_table(tmp_path / rel).equals(pq.read_table(CORPUS / rel))
        else:
            assert (tmp_path / rel).read_bytes() == (CORPUS / rel).read_bytes(), rel


# --------------------------------------------------------------------------- recipe typos
@pytest.mark.parametrize(
    "raw,expected",
    [
        ({"orpo": {"bata": 0.1}}, "orpo.bata: unknown key (did you mean 'beta'?)"),
        ({"data": {"test_sise": 0.1}}, "data.test_sise: unknown key (did you mean 'test_size'?)"),
        ({"data": {"sources": [{"path": "x", "fromat": "standard"}]}}, "data.sources.0.fromat: unknown key (did you mean 'format'?)"),
        ({"data": {"sources": [{"path": "x", "binarize": {"stratgy": "all_pairs"}}]}}, "did you mean 'strategy'?"),
        ({"trian": {}}, "trian: unknown key (did you mean 'train'?)"),
    ],
)
def test_recipe_key_typos_get_did_you_mean(raw, expected):
    base = {"data": {"sources": [{"path": "x"}]}}
    merged = {**base, **raw}
    if "data" in raw:
        merged["data"] = {**base["data"], **raw["data"]}
    with pytest.raises(RecipeError) as exc:
        recipe_from_dict(merged)
    assert expected in str(exc.value)


def test_unrelated_unknown_key_gets_no_suggestion():
    with pytest.raises(RecipeError) as exc:
        recipe_from_dict({"data": {"sources": [{"path": "x"}]}, "orpo": {"zzzzzz": 1}})
    assert "orpo.zzzzzz: unknown key" in str(exc.value) and "did you mean" not in str(exc.value)


# --------------------------------------------------------------------------- the CLI: exit codes, stdout, stderr
def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def _write_recipe(tmp_path: Path, source: Path) -> Path:
    recipe = tmp_path / "r.yaml"
    out = tmp_path / ("an-output-folder-with-a-long-name-so-that-error-lines-exceed-eighty-columns" * 2)
    recipe.write_text(f"output_dir: {out}\ndata:\n  sources:\n    - path: {source}\n  test_size: 0\n")
    return recipe


def test_cli_prep_bad_input_exit_2_one_unwrapped_line_on_stderr(tmp_path):
    recipe = _write_recipe(tmp_path, CORPUS / "stray_ratings_keys.jsonl")
    p = subprocess.run(
        [sys.executable, "-m", "flows.cli", "prep", str(recipe)],
        capture_output=True, text=True, cwd=ROOT, env=_cli_env(), timeout=120,
    )
    assert p.returncode == 2 and p.stdout == ""
    (line,) = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert len(line) > 120  # not hard-wrapped at 80 columns
    assert "stray_ratings_keys.jsonl: line 7: field 'responses':" in line and line.endswith("of its own")

    p = subprocess.run(
        [sys.executable, "-m", "flows.cli", "prep", str(recipe), "--on-error", "skip"],
        capture_output=True, text=True, cwd=ROOT, env=_cli_env(), timeout=120,
    )
    assert p.returncode == 0, p.stderr
    stats = json.loads(p.stdout)  # stdout is the result and nothing else
    assert stats["rows_kept"] == 19 and stats["dropped"] == {"foreign_keys": 1}


def test_cli_stdout_holds_only_the_result(tmp_path):
    """print(), raw writes to fd 1 and subprocess output during a command go to stderr."""
    script = tmp_path / "noisy.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, subprocess, sys
            from flows import cli

            @cli.app.command("noisy")
            def noisy() -> None:
                print("{'loss': 1.0, 'epoch': 0.1}")
                sys.stdout.flush()
                os.write(1, b"raw fd noise\\n")
                subprocess.run([sys.executable, "-c", "print('child noise')"], check=True)
                cli._print_json({"ok": True})

            cli.app()
            """
        )
    )
    p = subprocess.run(
        [sys.executable, str(script), "noisy"], capture_output=True, text=True, cwd=ROOT, env=_cli_env(), timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"ok": True}
    for noise in ("{'loss': 1.0, 'epoch': 0.1}", "raw fd noise", "child noise"):
        assert noise in p.stderr and noise not in p.stdout

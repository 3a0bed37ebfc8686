"""Bad input: a DataError naming file, row/line and field, no output written; on_error: skip counts instead."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orpo_core.config import recipe_from_dict
from orpo_core.data.errors import DataError
from orpo_core.data.prepare import prepare_dataset
from orpo_core.data.schema import read_pairs


def line(obj) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


def U(t):
    return {"role": "user", "content": t}


def A(t):
    return {"role": "assistant", "content": t}


GOOD1 = {"prompt": "first?", "chosen": "yes", "rejected": "no"}
GOOD3 = {"prompt": "third?", "chosen": "up", "rejected": "down"}
CONV1 = {"chosen": [U("hi"), A("hello")], "rejected": [U("hi"), A("go away")]}
CONV3 = {"chosen": [U("bye"), A("see you")], "rejected": [U("bye"), A("whatever")]}


def uf_row(instruction, n):
    return {
        "instruction": instruction,
        "completions": [
            {"response": f"answer {k}", "overall_score": float(k + 1), "annotations": {}} for k in range(n)
        ],
    }


# (case id, file name, bytes of the file (line 2 is the bad one), extra source options, reason, field)
ROW_CASES = [
    (
        "malformed_json",
        "p.jsonl",
        line(GOOD1) + b'{"prompt": "second?", "chosen": "a", "rejected": }\n' + line(GOOD3),
        {},
        "malformed_json",
        "rejected",
    ),
    (
        "unknown_role",
        "p.jsonl",
        line(CONV1)
        + line({"chosen": [U("x"), {"role": "bot", "content": "y"}], "rejected": [U("x"), A("z")]})
        + line(CONV3),
        {},
        "unknown_role",
        "chosen[1].role",
    ),
    (
        "unknown_role_sharegpt",
        "p.jsonl",
        line(
            {
                "conversations": [{"from": "human", "value": "q1"}],
                "chosen": {"from": "gpt", "value": "a"},
                "rejected": {"from": "gpt", "value": "b"},
            }
        )
        + line(
            {
                "conversations": [{"from": "observation", "value": "q2"}],
                "chosen": {"from": "gpt", "value": "a"},
                "rejected": {"from": "gpt", "value": "b"},
            }
        )
        + line(
            {
                "conversations": [{"from": "human", "value": "q3"}],
                "chosen": {"from": "gpt", "value": "c"},
                "rejected": {"from": "gpt", "value": "d"},
            }
        ),
        {},
        "unknown_role",
        "conversations[0].from",
    ),
    (
        "non_string_completion",
        "p.jsonl",
        line(GOOD1) + line({"prompt": "second?", "chosen": 42, "rejected": "no"}) + line(GOOD3),
        {},
        "non_string",
        "chosen",
    ),
    (
        "non_string_message_content",
        "p.jsonl",
        line(CONV1)
        + line({"chosen": [U("x"), A("y")], "rejected": [U("x"), {"role": "assistant", "content": ["z"]}]})
        + line(CONV3),
        {},
        "non_string",
        "rejected[1].content",
    ),
    (
        "non_string_rating_response",
        "p.jsonl",
        line(uf_row("one", 2))
        + line(
            {
                "instruction": "two",
                "completions": [{"response": "ok", "overall_score": 1}, {"response": None, "overall_score": 2}],
            }
        )
        + line(uf_row("three", 3)),
        {},
        "non_string",
        "completions[1].response",
    ),
    (
        "ratings_fewer_than_two_completions",
        "p.jsonl",
        line(uf_row("one", 2)) + line(uf_row("two", 1)) + line(uf_row("three", 4)),
        {},
        "too_few_completions",
        "completions",
    ),
    (
        "generic_ratings_single_response",
        "p.jsonl",
        line({"prompt": "a", "responses": ["x", "y"], "scores": [1, 0]})
        + line({"prompt": "b", "responses": ["x"], "scores": [1]})
        + line({"prompt": "c", "responses": ["x", "y"], "scores": [0, 1]}),
        {},
        "too_few_completions",
        "responses",
    ),
    (
        "not_utf8_line",
        "p.jsonl",
        line(GOOD1) + b'{"prompt": "second?", "chosen": "caf\xe9 au lait", "rejected": "no"}\n' + line(GOOD3),
        {},
        "not_utf8",
        "chosen",
    ),
    (
        "prompt_ending_with_assistant",
        "p.jsonl",
        line({"prompt": [U("a")], "chosen": [A("b")], "rejected": [A("c")]})
        + line({"prompt": [U("a"), A("b")], "chosen": [A("c")], "rejected": [A("d")]})
        + line({"prompt": [U("e")], "chosen": [A("f")], "rejected": [A("g")]}),
        {},
        "bad_conversation",
        "prompt[1].role",
    ),
    (
        "bad_score",
        "p.jsonl",
        line(GOOD1) + line({**GOOD1, "prompt": "second?", "metadata": "{'score_chosen': 'high'}"}) + line(GOOD3),
        {},
        "bad_score",
        "metadata.score_chosen",
    ),
]


def recipe_for(path: Path, on_error: str = "raise", **src):
    return recipe_from_dict({"data": {"sources": [{"path": str(path), **src}], "on_error": on_error, "test_size": 0}})


def assert_no_output(out: Path):
    assert not out.exists(), "no output folder may be created on error"
    leftovers = [p.name for p in out.parent.iterdir()] if out.parent.exists() else []
    assert leftovers == [], leftovers


@pytest.mark.parametrize("case,name,content,opts,reason,field", ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_row_errors_raise_with_location(tmp_path, case, name, content, opts, reason, field):
    path = tmp_path / name
    path.write_bytes(content)
    out = tmp_path / "run" / "data"
    with pytest.raises(DataError) as exc:
        prepare_dataset(recipe_for(path, **opts), out)
    err = exc.value
    msg = str(err)
    assert err.reason == reason
    assert str(path) in msg and "line 2" in msg and f"field '{field}'" in msg, msg
    assert (err.file, err.row, err.field) == (str(path), "line 2", field)
    assert_no_output(out)


@pytest.mark.parametrize("case,name,content,opts,reason,field", ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_row_errors_skipped_and_counted(tmp_path, case, name, content, opts, reason, field):
    path = tmp_path / name
    path.write_bytes(content)
    out = tmp_path / "run" / "data"
    stats = prepare_dataset(recipe_for(path, on_error="skip", **opts), out)
    assert stats["rows_read"] == 3
    assert stats["dropped"].get(reason) == 1, stats["dropped"]
    assert stats["rows_read"] + stats["pairs_added_by_binarize"] == stats["rows_kept"] + stats["dropped_total"]
    origins = {r["origin"] for r in read_pairs(out / "train.parquet")}
    assert f"{path}:2" not in origins and f"{path}:1" in origins and f"{path}:3" in origins
    assert any("line 2" in m for m in stats["error_examples"][reason])
    assert json.loads((out / "stats.json").read_text())["dropped"][reason] == 1


# --------------------------------------------------------------------------- whole-source problems: always fatal
def write_empty_parquet(path: Path) -> None:
    pq.write_table(
        pa.table(
            {
                "prompt": pa.array([], pa.string()),
                "chosen": pa.array([], pa.string()),
                "rejected": pa.array([], pa.string()),
            }
        ),
        path,
    )


FATAL_EMPTY = [
    ("empty_jsonl", "e.jsonl", b""),
    ("blank_lines_jsonl", "e.jsonl", b"\n   \n\n"),
    ("empty_json", "e.json", b"[]"),
    ("header_only_csv", "e.csv", b"prompt,chosen,rejected\n"),
    ("empty_gzip_jsonl", "e.jsonl.gz", None),
    ("empty_parquet", "e.parquet", None),
]


@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize("case,name,content", FATAL_EMPTY, ids=[c[0] for c in FATAL_EMPTY])
def test_empty_file_is_fatal(tmp_path, case, name, content, on_error):
    path = tmp_path / name
    if name.endswith(".gz"):
        import gzip

        with gzip.open(path, "wb"):
            pass
    elif name.endswith(".parquet"):
        write_empty_parquet(path)
    else:
        path.write_bytes(content)
    out = tmp_path / "run" / "data"
    with pytest.raises(DataError, match="empty") as exc:
        prepare_dataset(recipe_for(path, on_error), out)
    assert exc.value.reason == "empty_file" and exc.value.fatal
    assert str(path) in str(exc.value)
    assert_no_output(out)


def test_empty_folder_is_fatal(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("not data")
    with pytest.raises(DataError, match="no data files"):
        prepare_dataset(recipe_for(tmp_path / "src", "skip"), tmp_path / "run" / "data")


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_misspelled_column_is_fatal_with_suggestion(tmp_path, on_error):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"".join(line({"prompt": f"q{i}", "chosen": "a", "rejectd": "b"}) for i in range(3)))
    out = tmp_path / "run" / "data"
    with pytest.raises(DataError) as exc:
        prepare_dataset(recipe_for(path, on_error), out)
    msg = str(exc.value)
    assert exc.value.reason == "missing_column"
    assert str(path) in msg and "line 1" in msg and "field 'rejected'" in msg
    assert "did you mean 'rejectd'" in msg and "columns: {rejected: rejectd}" in msg
    assert_no_output(out)


def test_missing_column_in_parquet_names_row_and_format(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"prompt": ["q"], "chosen": ["a"], "reject": ["b"]}), path)
    with pytest.raises(DataError) as exc:
        prepare_dataset(recipe_for(path, "skip", format="standard"), tmp_path / "run" / "data")
    msg = str(exc.value)
    assert "row 0" in msg and "standard format" in msg and "did you mean 'reject'" in msg


def test_misspelled_mapped_column(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(line({"instruction": "q", "good": "a", "bad": "b"}))
    cols = {"prompt": "instrution", "chosen": "good", "rejected": "bad"}
    with pytest.raises(DataError) as exc:
        prepare_dataset(recipe_for(path, columns=cols), tmp_path / "run" / "data")
    msg = str(exc.value)
    assert "missing column 'instrution' (mapped from 'prompt')" in msg and "did you mean 'instruction'" in msg


def test_unknown_column_role_in_mapping(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(line(GOOD1))
    with pytest.raises(DataError) as exc:
        prepare_dataset(recipe_for(path, columns={"promt": "prompt"}), tmp_path / "run" / "data")
    assert exc.value.reason == "bad_config" and "did you mean 'prompt'" in str(exc.value)


def test_row_missing_a_field_is_row_level(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(line(GOOD1) + line({"prompt": "second?", "chosen": "a"}) + line(GOOD3))
    with pytest.raises(DataError) as exc:
        prepare_dataset(recipe_for(path), tmp_path / "run" / "data")
    assert exc.value.reason == "missing_field" and "line 2" in str(exc.value) and "field 'rejected'" in str(exc.value)
    stats = prepare_dataset(recipe_for(path, "skip"), tmp_path / "run2" / "data")
    assert stats["dropped"] == {"missing_field": 1} and stats["rows_kept"] == 2


@pytest.mark.parametrize("name", ["bad.csv", "bad.json"])
def test_not_utf8_whole_file_formats_are_fatal_and_name_the_line(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".csv"):
        path.write_bytes(b"prompt,chosen,rejected\nq1,a,b\nq2,caf\xe9,b\n")
    else:
        path.write_bytes(
            b'[\n {"prompt": "q1", "chosen": "a", "rejected": "b"},\n'
            b' {"prompt": "q2", "chosen": "caf\xe9", "rejected": "b"}\n]\n'
        )
    out = tmp_path / "run" / "data"
    with pytest.raises(DataError) as exc:
        prepare_dataset(recipe_for(path, "skip"), out)
    assert exc.value.reason == "not_utf8" and "line 3" in str(exc.value) and str(path) in str(exc.value)
    assert_no_output(out)


def test_bad_file_in_second_source_leaves_no_output(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_bytes(line(GOOD1) + line(GOOD3))
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"")
    recipe = recipe_from_dict({"data": {"sources": [{"path": str(good)}, {"path": str(bad)}]}})
    out = tmp_path / "run" / "data"
    with pytest.raises(DataError, match="bad.jsonl"):
        prepare_dataset(recipe, out)
    assert_no_output(out)


def test_source_with_no_readable_row_is_fatal_even_when_skipping(tmp_path):
    path = tmp_path / "all_bad.jsonl"
    path.write_bytes(b"{oops\n[1, 2]\n")
    with pytest.raises(DataError) as exc:
        prepare_dataset(recipe_for(path, "skip"), tmp_path / "run" / "data")
    assert exc.value.fatal and "no readable record in 2 rows" in str(exc.value) and "line 1" in str(exc.value)

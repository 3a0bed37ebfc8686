"""Chunked preparation (orpo_core/data/chunked.py): the same output whatever the chunk size and data.num_proc."""

from __future__ import annotations

import json
import pickle
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import orpo_core.data.chunked as chunked
from orpo_core.config import recipe_from_dict
from orpo_core.data.errors import DataError, RowRef
from orpo_core.data.loading import _JsonParser, iter_jsonl, parse_jsonl_line
from orpo_core.data.prepare import prepare_dataset, split_groups

FIX = Path(__file__).parent / "fixtures" / "data"


def U(t):
    return {"role": "user", "content": t}


def A(t):
    return {"role": "assistant", "content": t}


def make_sources(tmp_path: Path) -> list[dict]:
    """A standard .jsonl with bad rows, duplicates and shared prompts, a conversational
    .parquet, a ratings file binarized with all_pairs and best_vs_random, a CSV."""
    lines = []
    for i in range(60):
        row = {"prompt": f"q{i % 23}", "chosen": f"good {i}", "rejected": f"bad {i}"}
        if i % 17 == 5:
            row = {"prompt": "q", "chosen": f"same {i}", "rejected": f"same {i}"}  # identical
        lines.append(json.dumps(row))
        if i % 11 == 3:
            lines.append(json.dumps(row))  # duplicate
        if i % 13 == 7:
            lines.append('{"prompt": "broken", "chosen": ')  # malformed
        if i % 19 == 2:
            lines.append("")  # blank line
    std = tmp_path / "std.jsonl"
    std.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode())  # BOM, CRLF, no final newline
    conv = tmp_path / "conv.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [{"chosen": [U(f"c{i}"), A(f"yes {i}")], "rejected": [U(f"c{i}"), A(f"no {i}")]} for i in range(40)]
        ),
        conv,
    )
    csv = tmp_path / "std.csv"
    csv.write_text("prompt,chosen,rejected\n" + "".join(f"csv {i},a {i},b {i}\n" for i in range(25)))
    return [
        {"path": str(std)},
        {"path": str(conv), "max_rows": 30},
        {"path": str(FIX / "ratings_generic.jsonl"), "binarize": {"strategy": "all_pairs"}},
        {"path": str(FIX / "ultrafeedback_ratings.jsonl"), "binarize": {"strategy": "best_vs_random"}},
        {"path": str(csv), "weight": 2},
    ]


def run(tmp_path: Path, sources, name: str, **data) -> tuple[dict, pa.Table, pa.Table]:
    data.setdefault("test_size", 0.2)
    recipe = recipe_from_dict({"seed": 5, "data": {"sources": sources, "on_error": "skip", **data}})
    out = tmp_path / name / "data"
    stats = prepare_dataset(recipe, out)
    stats.pop("data_hash")  # hashes the prepare stage's recipe fields
    return stats, pq.read_table(out / "train.parquet"), pq.read_table(out / "test.parquet")


def test_chunk_size_does_not_change_the_output(tmp_path, monkeypatch):
    sources = make_sources(tmp_path)
    ref = run(tmp_path, sources, "one_chunk")
    assert ref[0]["dropped"]["malformed_json"] == 5 and ref[0]["dropped"]["duplicate"] >= 6
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 200)
    monkeypatch.setattr(chunked, "CHUNK_ROWS", 3)
    small = run(tmp_path, sources, "small_chunks")
    assert small[0] == ref[0]
    assert small[1].equals(ref[1]) and small[2].equals(ref[2])


@pytest.mark.slow
def test_num_proc_2_gives_the_same_output_and_errors(tmp_path, monkeypatch):
    """Worker processes (spawned) over many small chunks: same rows, stats, error examples;
    in raise mode the same first error."""
    sources = make_sources(tmp_path)
    ref = run(tmp_path, sources, "np1")
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 300)  # chunking happens in the calling process
    monkeypatch.setattr(chunked, "CHUNK_ROWS", 4)
    par = run(tmp_path, sources, "np2", num_proc=2)
    assert par[0] == ref[0]
    assert par[1].equals(ref[1]) and par[2].equals(ref[2])

    errors = []
    for n in (1, 2):
        recipe = recipe_from_dict({"data": {"sources": sources[:1], "num_proc": n}})
        out = tmp_path / f"raise{n}" / "data"
        with pytest.raises(DataError) as exc:
            prepare_dataset(recipe, out)
        errors.append((str(exc.value), exc.value.file, exc.value.row, exc.value.field, exc.value.reason))
        assert not out.exists() and list(out.parent.iterdir()) == []
    first_bad = next(i for i, t in enumerate(Path(sources[0]["path"]).read_text().splitlines(), 1) if "broken" in t)
    assert errors[0] == errors[1] and errors[1][2] == f"line {first_bad}"


def test_jsonl_chunks_read_the_same_records_as_iter_jsonl(tmp_path):
    path = tmp_path / "x.jsonl"
    rows = [json.dumps({"i": i, "t": "é" * (i % 5)}) for i in range(50)]
    rows[7] = "{bad"
    rows[8] = ""
    rows[20] = '{"a": 1, "a": 2}'
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode() + b"\r\n\r\n")

    def flat(items):
        return [(ref, rec if isinstance(rec, dict) else (rec.reason, str(rec))) for ref, rec in items]

    expected = flat(iter_jsonl(path))
    for size in (1, 10, 64, 1 << 20):
        got = flat(r for c in chunked.jsonl_chunks(path, str(path), size) for r in c.records())
        assert got == expected, size


def test_parse_jsonl_line_blank_and_bom():
    p = _JsonParser()
    assert parse_jsonl_line(b"  \r\n", 3, "f", p) is None
    ref, rec = parse_jsonl_line(b'\xef\xbb\xbf{"a": 1}\n', 1, "f", p)
    assert ref == RowRef("f", 1, "line") and rec == {"a": 1}


def test_data_error_survives_pickling():
    e = DataError("bad", ref=RowRef("f.jsonl", 4, "line"), field="chosen", reason="malformed_json", fatal=True)
    e2 = pickle.loads(pickle.dumps(e))
    assert (str(e2), e2.file, e2.row, e2.field, e2.reason, e2.fatal, e2.detail) == (
        str(e), "f.jsonl", "line 4", "chosen", "malformed_json", True, "bad",
    )


def _split_reference(keys: list, test_size: float, seed: int) -> set[int]:
    """The list-based grouped split used before the chunked stage (one Python object per pair)."""
    if test_size <= 0 or not keys:
        return set()
    groups: dict = defaultdict(list)
    for i, k in enumerate(keys):
        groups[k].append(i)
    order = list(groups)
    if len(order) < 2:
        return set()
    random.Random(seed).shuffle(order)
    target = max(1, int(round(test_size * len(keys))))
    test: set[int] = set()
    for k in order[:-1]:
        if len(test) >= target:
            break
        test.update(groups[k])
    return test


@pytest.mark.parametrize("seed", range(6))
def test_split_groups_matches_the_list_based_split(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 300)
    keys = [f"p{rng.randint(0, max(1, n // 3))}".encode() for _ in range(n)]
    for test_size in (0.0, 0.1, 0.33, 0.9):
        got = set(np.flatnonzero(split_groups(np.array(keys, dtype="S20"), test_size, seed * 7)).tolist())
        assert got == _split_reference(keys, test_size, seed * 7)

"""prepare_dataset: cleaning, mixing, splitting, stats accounting, atomic output, real shared data."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from orpo_core.config import recipe_from_dict
from orpo_core.data.errors import DataError
from orpo_core.data.prepare import mix_targets, prepare_dataset
from orpo_core.data.schema import PAIR_SCHEMA, read_pairs

FIX = Path(__file__).parent / "fixtures" / "data"


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def std(i, chosen=None, rejected=None, prompt=None, **extra):
    return {
        "prompt": f"question {i}?" if prompt is None else prompt,
        "chosen": f"good answer {i}" if chosen is None else chosen,
        "rejected": f"bad answer {i}" if rejected is None else rejected,
        **extra,
    }


def run(tmp_path, sources, seed=42, **data):
    recipe = recipe_from_dict({"seed": seed, "data": {"sources": sources, **data}})
    out = tmp_path / "out" / "data"
    stats = prepare_dataset(recipe, out)
    return stats, read_pairs(out / "train.parquet"), read_pairs(out / "test.parquet")


def balanced(stats) -> bool:
    return stats["rows_read"] + stats["pairs_added_by_binarize"] == stats["rows_kept"] + sum(stats["dropped"].values())


# --------------------------------------------------------------------------- cleaning
def test_cleaning_drops_empty_identical_duplicates_and_counts_them(tmp_path):
    rows = [
        std(0),
        std(1, chosen="   "),  # empty chosen
        std(2, rejected=""),  # empty rejected
        std(3, chosen="same", rejected=" same "),  # identical after stripping
        std(0),  # exact duplicate of line 1
        std(4, prompt="  "),  # empty prompt
        std(5),
    ]
    f = write_jsonl(tmp_path / "c.jsonl", rows)
    stats, train, test = run(tmp_path, [{"path": f}], test_size=0)
    assert [r["prompt"][0]["content"] for r in train] == ["question 0?", "question 5?"]
    assert stats["dropped"] == {"empty_completion": 2, "identical": 1, "duplicate": 1, "empty_prompt": 1}
    assert stats["rows_read"] == 7 and stats["rows_kept"] == 2 and balanced(stats) and stats["accounting_ok"]
    # dedup off keeps the duplicate
    stats, train, _ = run(tmp_path, [{"path": f}], test_size=0, dedup=False)
    assert len(train) == 3 and "duplicate" not in stats["dropped"]


def test_dedup_across_sources_keeps_first(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [std(i) for i in range(3)])
    b = write_jsonl(tmp_path / "b.jsonl", [std(i) for i in range(2, 5)])
    stats, train, _ = run(tmp_path, [{"path": a, "label": "A"}, {"path": b, "label": "B"}], test_size=0)
    assert len(train) == 5
    assert stats["sources"]["B"]["dropped"] == {"duplicate": 1}
    assert [r["source"] for r in train].count("A") == 3


def test_min_score_margin_keeps_unscored_pairs(tmp_path):
    rows = [
        std(0, metadata="{'score_chosen': 9.0, 'score_rejected': 8.5}"),  # gap 0.5 < 1
        std(1, metadata="{'score_chosen': 9.0, 'score_rejected': 7.0}"),  # gap 2
        std(2),  # no scores: kept
        std(3, score_chosen=2.0, score_rejected=5.0),  # negative gap
    ]
    f = write_jsonl(tmp_path / "m.jsonl", rows)
    stats, train, _ = run(tmp_path, [{"path": f}], test_size=0, min_score_margin=1.0)
    assert [r["prompt"][0]["content"] for r in train] == ["question 1?", "question 2?"]
    assert stats["dropped"] == {"score_margin": 2}


# --------------------------------------------------------------------------- mixing
def test_mix_targets_shares():
    assert mix_targets([100, 300], [1, 1]) == [100, 100]
    assert mix_targets([100, 300], [3, 1]) == [100, 33]
    assert mix_targets([100, 300], [1, 3]) == [100, 300]
    assert mix_targets([1000, 10], [1, 1]) == [10, 10]


def test_weighted_mix_and_max_rows(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [std(i) for i in range(100)])
    b = write_jsonl(tmp_path / "b.jsonl", [std(1000 + i) for i in range(300)])
    sources = [{"path": a, "label": "A", "weight": 3}, {"path": b, "label": "B"}]  # B counts as weight 1
    stats, train, _ = run(tmp_path, sources, test_size=0)
    assert stats["splits"]["train"]["by_source"] == {"A": 100, "B": 33}
    assert stats["sources"]["B"]["dropped"] == {"weight_sampling": 267}
    assert balanced(stats)
    # seeded: same seed same sample, another seed another sample
    _, again, _ = run(tmp_path, sources, test_size=0)
    _, other, _ = run(tmp_path, sources, seed=7, test_size=0)
    pick = lambda rows: [r["origin"] for r in rows if r["source"] == "B"]  # noqa: E731
    assert pick(train) == pick(again) and pick(train) != pick(other)
    # max_rows caps a source before mixing
    stats, train, _ = run(tmp_path, [{"path": b, "label": "B", "max_rows": 10}], test_size=0)
    assert len(train) == 10 and stats["dropped"] == {"max_rows": 290}
    assert len({r["origin"] for r in train}) == 10


# --------------------------------------------------------------------------- splitting
def test_split_is_seeded_and_keeps_prompts_together(tmp_path):
    rows = []
    for p in range(40):  # 40 prompts x 3 answers pairs = 120 pairs
        for k in range(3):
            rows.append(std(p, chosen=f"good {p}.{k}", rejected=f"bad {p}.{k}", prompt=f"prompt {p}"))
    f = write_jsonl(tmp_path / "s.jsonl", rows)
    stats, train, test = run(tmp_path, [{"path": f}], test_size=0.25)
    assert len(train) + len(test) == 120
    assert 27 <= len(test) <= 33  # groups of 3 around round(0.25 * 120) = 30
    train_prompts = {r["prompt"][0]["content"] for r in train}
    test_prompts = {r["prompt"][0]["content"] for r in test}
    assert not train_prompts & test_prompts
    assert stats["splits"]["test"]["rows"] == len(test)
    _, train2, test2 = run(tmp_path, [{"path": f}], test_size=0.25)
    _, _, test3 = run(tmp_path, [{"path": f}], seed=1, test_size=0.25)
    assert [r["origin"] for r in test] == [r["origin"] for r in test2]
    assert [r["origin"] for r in test] != [r["origin"] for r in test3]


def test_test_size_zero_writes_empty_test_file_with_schema(tmp_path):
    f = write_jsonl(tmp_path / "z.jsonl", [std(i) for i in range(5)])
    stats, train, test = run(tmp_path, [{"path": f}], test_size=0)
    assert len(train) == 5 and test == []
    assert pq.read_schema(tmp_path / "out" / "data" / "test.parquet").equals(PAIR_SCHEMA)
    meta = pq.read_metadata(tmp_path / "out" / "data" / "train.parquet")
    assert meta.row_group(0).column(0).compression == "ZSTD"


def test_test_split_from_folder_split_names(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [std(i) for i in range(6)])
    write_jsonl(folder / "test.jsonl", [std(100 + i) for i in range(2)])
    stats, train, test = run(tmp_path, [{"path": str(folder), "test_split": "test", "label": "ds"}], test_size=0.5)
    # with a test_split the random split is not used: all train-file rows train, test file rows test
    assert len(train) == 6 and len(test) == 2
    assert all(r["origin"].startswith(str(folder / "train.jsonl")) for r in train)
    assert all(r["origin"].startswith(str(folder / "test.jsonl")) for r in test)
    assert stats["sources"]["ds"]["inputs"]["test"]["read"] == 2


def test_missing_test_split_is_an_error(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", [std(i) for i in range(3)])
    with pytest.raises(DataError, match="test_split 'nope'"):
        run(tmp_path, [{"path": f, "test_split": "nope"}])


def test_missing_local_file_names_it(tmp_path):
    with pytest.raises(DataError, match="not found") as e:
        run(tmp_path, [{"path": str(tmp_path / "nope.jsonl")}])
    assert "nope.jsonl" in str(e.value)


def test_nothing_left_is_an_error_and_writes_nothing(tmp_path):
    f = write_jsonl(tmp_path / "e.jsonl", [std(0, chosen="x", rejected="x")])
    with pytest.raises(DataError, match="no training pairs"):
        run(tmp_path, [{"path": f}])
    assert not (tmp_path / "out" / "data").exists()


# --------------------------------------------------------------------------- atomic output
def test_rerun_replaces_output_and_leaves_no_temp_dirs(tmp_path):
    f1 = write_jsonl(tmp_path / "one.jsonl", [std(i) for i in range(4)])
    run(tmp_path, [{"path": f1}], test_size=0)
    out = tmp_path / "out" / "data"
    (out / "stale.txt").write_text("old")
    f2 = write_jsonl(tmp_path / "two.jsonl", [std(i) for i in range(2)])
    _, train, _ = run(tmp_path, [{"path": f2}], test_size=0)
    assert len(train) == 2
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in out.iterdir()) == ["stats.json", "test.parquet", "train.parquet"]
    assert [p.name for p in out.parent.iterdir()] == ["data"]


def test_failed_run_keeps_previous_output(tmp_path):
    f1 = write_jsonl(tmp_path / "one.jsonl", [std(i) for i in range(4)])
    run(tmp_path, [{"path": f1}], test_size=0)
    out = tmp_path / "out" / "data"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(std(0)) + "\n{not json\n")
    with pytest.raises(DataError):
        run(tmp_path, [{"path": str(bad)}], test_size=0)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in out.parent.iterdir()] == ["data"]


# --------------------------------------------------------------------------- real shared data
def final_assistant_text(transcript: str) -> str:
    """What follows the last Human turn; consecutive Assistant turns joined by a blank line."""
    tail = transcript.rsplit("\n\nHuman:", 1)[1]
    parts = [p.strip() for p in tail.split("\n\nAssistant:")[1:]]
    return "\n\n".join(p for p in parts if p)


def test_acceptance_hh_rlhf_harmless(tmp_path, shared_data):
    path = shared_data / "preference" / "hh_rlhf_harmless_base_test.jsonl.gz"
    stats, train, test = run(tmp_path, [{"path": str(path)}], test_size=0.1)
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        raw = [json.loads(line) for line in fh]
    # every input row accounted for
    assert stats["rows_read"] == len(raw) == 2312
    assert stats["rows_read"] == stats["rows_kept"] + sum(stats["dropped"].values())
    assert stats["rows_kept"] == len(train) + len(test)
    assert len(test) == pytest.approx(0.1 * stats["rows_kept"], abs=25)
    multi = 0
    for r in train + test:
        roles = [m["role"] for m in r["prompt"]]
        assert roles[0] == "user" and roles[-1] == "user"
        assert all(a != b for a, b in zip(roles, roles[1:])), roles  # alternating turns
        assert all(m["content"].strip() for m in r["prompt"])
        assert [m["role"] for m in r["chosen"]] == ["assistant"] == [m["role"] for m in r["rejected"]]
        line = int(r["origin"].rsplit(":", 1)[1])
        src = raw[line - 1]
        # chosen/rejected are the final assistant turn(s) after the last Human turn of the raw transcripts
        assert r["chosen"][0]["content"] == final_assistant_text(src["chosen"])
        assert r["rejected"][0]["content"] == final_assistant_text(src["rejected"])
        # the prompt has one user message per Human turn before the final response
        assert roles.count("user") == len(re.findall(r"\n\nHuman:", src["chosen"]))
        multi += len(roles) > 1
    assert multi > 1000  # harmless-base is mostly multi-turn
    assert len({r["origin"] for r in train + test}) == len(train) + len(test)
    assert set(stats["dropped"]) <= {"empty_completion", "identical", "duplicate", "prompt_mismatch"}


def test_acceptance_ultrafeedback_sample_with_eval_split(tmp_path, shared_data):
    pref = shared_data / "preference"
    src = {
        "path": str(pref / "ultrafeedback_binarized_sample_train.jsonl"),
        "test_split": str(pref / "ultrafeedback_binarized_sample_eval.jsonl"),
        "label": "uf",
    }
    stats, train, test = run(tmp_path, [src])
    assert stats["sources"]["uf"]["format"] == "standard"
    assert stats["rows_read"] == 1200 and balanced(stats)
    assert all(r["origin"].startswith(src["test_split"]) for r in test)
    assert len(test) <= 200 and len(train) <= 1000
    raw = [json.loads(line) for line in open(src["path"], encoding="utf-8")]
    for r in train[:50]:
        meta = raw[int(r["origin"].rsplit(":", 1)[1]) - 1]["metadata"]
        assert (r["score_chosen"], r["score_rejected"]) == (meta["score_chosen"], meta["score_rejected"])
    assert stats["splits"]["train"]["with_scores"] == len(train)


def test_acceptance_mixed_real_and_ratings_fixture(tmp_path, shared_data):
    """HH, the UltraFeedback sample and an openbmb/UltraFeedback-schema ratings file in one mix."""
    pref = shared_data / "preference"
    sources = [
        {"path": str(pref / "hh_rlhf_harmless_base_test.jsonl.gz"), "label": "hh", "max_rows": 300},
        {"path": str(pref / "ultrafeedback_binarized_sample_eval.jsonl"), "label": "uf"},
        {"path": str(FIX / "ultrafeedback_ratings.jsonl"), "label": "ratings", "binarize": {"strategy": "all_pairs"}},
    ]
    stats, train, test = run(tmp_path, sources, test_size=0.1)
    assert {s: e["format"] for s, e in stats["sources"].items()} == {"hh": "hh", "uf": "standard", "ratings": "ratings"}
    assert stats["sources"]["hh"]["kept"] == 300
    assert stats["sources"]["ratings"]["kept"] == 9
    assert balanced(stats) and stats["accounting_ok"]
    for name, e in stats["sources"].items():
        assert e["read"] + e["pairs_added_by_binarize"] == e["kept"] + e["dropped_total"], name
        assert e["outputs"]["train"] + e["outputs"]["test"] == e["kept"], name
    on_disk = json.loads((tmp_path / "out" / "data" / "stats.json").read_text())
    assert on_disk == stats

"""Every preference format normalizes to the pair schema (hand-built fixtures in tests/fixtures/data/)."""

from __future__ import annotations

import gzip
import json
import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orpo_core.config import recipe_from_dict
from orpo_core.data.binarize import select_pairs
from orpo_core.data.errors import DataError, DropRow
from orpo_core.data.formats import (
    ColumnMap,
    detect_format,
    parse_hh,
    parse_metadata_scores,
)
from orpo_core.data.prepare import prepare_dataset
from orpo_core.data.schema import PAIR_SCHEMA, read_pairs

FIX = Path(__file__).parent / "fixtures" / "data"


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


def prep(tmp_path, sources, **data):
    """Run the stage on ``sources`` with everything in train (test_size 0 unless given)."""
    data.setdefault("test_size", 0.0)
    recipe = recipe_from_dict({"seed": data.pop("seed", 42), "data": {"sources": sources, **data}})
    out = tmp_path / "data"
    stats = prepare_dataset(recipe, out)
    return stats, read_pairs(out / "train.parquet"), read_pairs(out / "test.parquet")


def only_source(stats):
    (entry,) = stats["sources"].values()
    return entry


def accounted(stats):
    return stats["rows_read"] + stats["pairs_added_by_binarize"] == stats["rows_kept"] + sum(stats["dropped"].values())


# --------------------------------------------------------------------------- standard
def test_standard_strings_with_metadata_scores(tmp_path):
    path = str(FIX / "standard.jsonl")
    stats, train, test = prep(tmp_path, [{"path": path}])
    assert only_source(stats)["format"] == "standard"
    assert test == []
    assert [r["prompt"] for r in train] == [
        [U("What is the capital of France?")],
        [U("Name a primary colour.")],
        [U("Translate 'chat' from French.")],
    ]
    assert train[0]["chosen"] == [A("The capital of France is Paris.")]
    assert train[0]["rejected"] == [A("France has no capital.")]
    # Python-repr metadata string, dict metadata with ints, and a None score
    assert [(r["score_chosen"], r["score_rejected"]) for r in train] == [(9.0, 3.5), (8.0, 7.0), (7.5, None)]
    assert [r["origin"] for r in train] == [f"{path}:{i}" for i in (1, 2, 3)]  # JSONL: 1-based lines
    assert {r["source"] for r in train} == {path}
    assert pq.read_schema(tmp_path / "data" / "train.parquet").equals(PAIR_SCHEMA)


def test_standard_autotrain_column_aliases_csv_with_system(tmp_path):
    cols = {"prompt_text_column": "question", "text_column": "good_answer", "rejected_text_column": "bad_answer"}
    stats, train, _ = prep(tmp_path, [{"path": str(FIX / "autotrain.csv"), "columns": cols, "label": "autotrain"}])
    assert stats["rows_kept"] == 3
    assert train[0]["prompt"] == [S("You are terse."), U("How many legs does a spider have?")]
    assert train[1]["prompt"] == [U("Is water wet?")]  # empty system cell: no system turn
    assert train[1]["chosen"] == [A('Water makes things wet; "wet" describes surfaces it touches.')]
    assert train[2]["rejected"] == [A("act")]
    assert [r["origin"].rsplit(":", 1)[1] for r in train] == ["0", "1", "2"]  # CSV: 0-based rows
    assert {r["source"] for r in train} == {"autotrain"}


def test_standard_plain_column_mapping(tmp_path):
    f = tmp_path / "orca.jsonl"
    f.write_text(json.dumps({"system": "", "question": "2+3?", "good": "5", "bad": "6"}) + "\n")
    _, train, _ = prep(
        tmp_path, [{"path": str(f), "columns": {"prompt": "question", "chosen": "good", "rejected": "bad"}}]
    )
    assert train == [dict(train[0], prompt=[U("2+3?")], chosen=[A("5")], rejected=[A("6")])]


# --------------------------------------------------------------------------- conversational
def test_conversational_implicit_prompt_is_longest_common_prefix(tmp_path):
    stats, train, _ = prep(tmp_path, [{"path": str(FIX / "conversational_implicit.jsonl")}])
    assert only_source(stats)["format"] == "conversational"
    assert train[0]["prompt"] == [U("Hi, what is 2+2?")]
    assert train[0]["chosen"] == [A("2+2 = 4.")] and train[0]["rejected"] == [A("2+2 = 5.")]
    assert train[1]["prompt"] == [S("Answer in one word."), U("Favourite fruit?"), A("Mango."), U("And vegetable?")]
    assert train[1]["chosen"] == [A("Carrot.")]
    assert (train[1]["score_chosen"], train[1]["score_rejected"]) == (8.0, 4.0)
    # the third conversation diverges at the first assistant turn: no shared prompt ending with a user turn
    assert stats["dropped"] == {"prompt_mismatch": 1}
    assert stats["rows_read"] == 3 and accounted(stats)


def test_conversational_explicit_prompt_json_array(tmp_path):
    stats, train, _ = prep(tmp_path, [{"path": str(FIX / "conversational_explicit.json")}])
    assert only_source(stats)["format"] == "conversational"
    assert train[1]["prompt"] == [S("You are a pirate."), U("Greet me.")]
    assert train[1]["chosen"] == [A("Ahoy, matey!")]
    assert [r["origin"].rsplit(":", 1)[1] for r in train] == ["0", "1"]


def test_conversational_prompt_column_plus_whole_conversations(tmp_path):
    """HuggingFaceH4/ultrafeedback_binarized: a prompt string and chosen/rejected holding [user, assistant]."""
    f = tmp_path / "h4.jsonl"
    row = {
        "prompt": "Hi?",
        "chosen": [U("Hi?"), A("Hello!")],
        "rejected": [U("Hi?"), A("Go away.")],
        "score_chosen": 7,
        "score_rejected": 2,
    }
    f.write_text(json.dumps(row) + "\n")
    _, train, _ = prep(tmp_path, [{"path": str(f)}])
    assert (train[0]["prompt"], train[0]["chosen"], train[0]["rejected"]) == (
        [U("Hi?")],
        [A("Hello!")],
        [A("Go away.")],
    )


def test_parquet_and_gzip_and_folder_inputs(tmp_path):
    rows = [{"chosen": [U(f"q{i}"), A(f"good {i}")], "rejected": [U(f"q{i}"), A(f"bad {i}")]} for i in range(4)]
    folder = tmp_path / "src"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:2]), folder / "part-a.parquet")
    with gzip.open(folder / "part-b.jsonl.gz", "wt", encoding="utf-8") as f:
        for r in rows[2:]:
            f.write(json.dumps(r) + "\n")
    stats, train, _ = prep(tmp_path, [{"path": str(folder)}])
    assert [r["prompt"] for r in train] == [[U(f"q{i}")] for i in range(4)]
    assert [r["chosen"] for r in train] == [[A(f"good {i}")] for i in range(4)]
    origins = [r["origin"] for r in train]
    assert origins[0].endswith("part-a.parquet:0") and origins[2].endswith("part-b.jsonl.gz:1")
    assert len(only_source(stats)["files"]) == 2


# --------------------------------------------------------------------------- hh
def test_hh_transcripts_become_multi_turn_prompts(tmp_path):
    stats, train, _ = prep(tmp_path, [{"path": str(FIX / "hh.jsonl")}])
    assert only_source(stats)["format"] == "hh"
    assert train[0]["prompt"] == [U("How do I boil an egg?")]
    assert train[0]["chosen"] == [A("Put it in boiling water for about nine minutes.")]
    assert train[0]["rejected"] == [A("Why would you want to do that?")]
    assert train[1]["prompt"] == [U("I need a gift idea."), A("Who is it for?"), U("My sister, she likes hiking.")]
    assert train[1]["rejected"] == [A("Socks.")]
    # consecutive Assistant turns merged so roles alternate
    assert train[2]["prompt"] == [U("Hello"), A("Hi there.\n\nHow can I help?"), U("What's 3 times 3?")]
    assert stats["splits"]["train"]["multi_turn"] == 2


def test_parse_hh_edge_cases():
    assert parse_hh("Human: hi\n\nAssistant: yo", "chosen") == [U("hi"), A("yo")]  # no leading blank line
    with pytest.raises(DataError, match="turn markers"):
        parse_hh("just some text", "chosen")
    with pytest.raises(DataError, match="start with a Human turn"):
        parse_hh("\n\nAssistant: hello\n\nHuman: hi\n\nAssistant: x", "rejected")


def test_hh_prompts_that_differ_are_dropped_not_mixed(tmp_path):
    f = tmp_path / "hh.jsonl"
    f.write_text(
        json.dumps(
            {
                "chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
                "rejected": "\n\nHuman: a\n\nAssistant: DIFFERENT\n\nHuman: c\n\nAssistant: e",
            }
        )
        + "\n"
        + json.dumps({"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: x\n\nAssistant: z"})
        + "\n"
    )
    stats, train, _ = prep(tmp_path, [{"path": str(f), "format": "hh"}])
    assert stats["dropped"] == {"prompt_mismatch": 1}
    assert [r["prompt"] for r in train] == [[U("x")]]


# --------------------------------------------------------------------------- sharegpt
def test_sharegpt_with_system_column_and_system_turn(tmp_path):
    stats, train, _ = prep(tmp_path, [{"path": str(FIX / "sharegpt.json")}])
    assert only_source(stats)["format"] == "sharegpt"
    assert train[0]["prompt"] == [S("You are helpful."), U("What colour is the sky?")]
    assert train[0]["chosen"] == [A("Blue on a clear day.")] and train[0]["rejected"] == [A("Green.")]
    assert train[1]["prompt"] == [S("Be brief."), U("Hi"), A("Hello!"), U("Count to three.")]
    assert train[1]["rejected"] == [A("1, 3, 2.")]


# --------------------------------------------------------------------------- ratings
UF = str(FIX / "ultrafeedback_ratings.jsonl")


def test_ultrafeedback_best_vs_worst_overall_score(tmp_path):
    stats, train, _ = prep(tmp_path, [{"path": UF}])
    assert only_source(stats)["format"] == "ratings"
    assert train[0]["prompt"] == [U("Write a haiku about rain.")]
    assert train[0]["chosen"][0]["content"].startswith("Soft rain")  # model a, 8.5
    assert train[0]["rejected"] == [A("I cannot write poems.")]  # model d, 2.0
    assert (train[0]["score_chosen"], train[0]["score_rejected"]) == (8.5, 2.0)
    assert (train[1]["score_chosen"], train[1]["score_rejected"]) == (9.5, 1.0)
    assert train[1]["rejected"] == [A("No.")]
    assert stats["dropped"] == {"tie": 1} and stats["rows_kept"] == 2 and accounted(stats)


def test_ultrafeedback_annotation_mean_ignores_na(tmp_path):
    _, train, _ = prep(tmp_path, [{"path": UF, "binarize": {"score": "annotations"}}])
    # mean aspect ratings, row 1: a 4.75, b 1.0, c 5.0 (N/A ignored), d 2.25
    assert train[0]["chosen"][0]["content"].startswith("Drops fall")
    assert train[0]["rejected"] == [A("Rain is wet.")]
    assert (train[0]["score_chosen"], train[0]["score_rejected"]) == (5.0, 1.0)
    # row 2: a and c tie at 5.0 -> the first one (a) is chosen
    assert train[1]["chosen"] == [A("Yes.")] and train[1]["rejected"] == [A("No.")]


def test_ultrafeedback_all_pairs_and_margin(tmp_path):
    stats, train, _ = prep(tmp_path, [{"path": UF, "binarize": {"strategy": "all_pairs"}}])
    # row 1: 4 distinct scores -> 6 pairs; row 2: 3 distinct -> 3 pairs; row 3: tie -> dropped
    assert len(train) == 9
    assert stats["pairs_added_by_binarize"] == 5 + 2
    assert all(r["score_chosen"] > r["score_rejected"] for r in train)
    assert accounted(stats)
    stats, train, _ = prep(tmp_path, [{"path": UF, "binarize": {"strategy": "all_pairs", "margin": 1.0}}])
    # gaps <= 1.0 skipped: (3.0, 2.0) in row 1, (9.0, 9.5) in row 2
    assert len(train) == 5 + 2
    assert all(r["score_chosen"] - r["score_rejected"] > 1.0 for r in train)
    assert only_source(stats)["binarize"]["below_margin_pairs_skipped"] == 2


def test_ultrafeedback_best_vs_random_is_seeded(tmp_path):
    def rejected_for(seed):
        _, train, _ = prep(tmp_path, [{"path": UF, "binarize": {"strategy": "best_vs_random", "seed": seed}}])
        assert train[0]["score_chosen"] == 8.5  # always the best
        return train[0]["rejected"][0]["content"]

    assert rejected_for(3) == rejected_for(3)
    picks = {rejected_for(s) for s in range(12)}
    assert picks <= {
        "Rain is wet.",
        "Drops fall, drops fall, drops / the gutter sings all night long / morning, silver streets",
        "I cannot write poems.",
    }
    assert len(picks) >= 2


def test_generic_ratings_prompt_responses_scores(tmp_path):
    _, train, _ = prep(tmp_path, [{"path": str(FIX / "ratings_generic.jsonl")}])
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in train] == [("4", "7"), ("cold", "hot")]


def test_select_pairs_strategies():
    assert select_pairs([1.0, 3.0, 2.0], "best_vs_worst") == [(1, 0)]
    assert sorted(select_pairs([1.0, 3.0, 2.0], "all_pairs")) == [(1, 0), (1, 2), (2, 0)]
    with pytest.raises(DropRow) as e:
        select_pairs([2.0, 2.0], "best_vs_worst")
    assert e.value.reason == "tie"
    with pytest.raises(DropRow) as e:
        select_pairs([2.0, None], "best_vs_worst")
    assert e.value.reason == "unscored"
    counts = Counter()
    assert select_pairs([1.0, 1.0, 5.0], "all_pairs", counters=counts) == [(2, 0), (2, 1)]
    assert counts["tied_pairs_skipped"] == 1
    # best_vs_random never picks a completion tied with the best
    rng = random.Random(0)
    assert {select_pairs([5.0, 5.0, 1.0], "best_vs_random", rng=rng)[0] for _ in range(20)} == {(0, 2)}


# --------------------------------------------------------------------------- detection, metadata, hub
def test_detect_format_rules():
    cm = ColumnMap({}, "x")
    assert detect_format({"prompt", "chosen", "rejected"}, [{"chosen": "a"}], cm) == "standard"
    assert detect_format({"chosen", "rejected"}, [{"chosen": [U("a")]}], cm) == "conversational"
    assert detect_format({"chosen", "rejected"}, [{"chosen": "\n\nHuman: a\n\nAssistant: b"}], cm) == "hh"
    assert detect_format({"conversations", "chosen", "rejected"}, [{}], cm) == "sharegpt"
    assert detect_format({"instruction", "completions"}, [{}], cm) == "ratings"
    assert detect_format({"prompt", "responses", "scores"}, [{}], cm) == "ratings"
    assert detect_format({"text"}, [{}], cm) is None


def test_format_override_beats_detection(tmp_path):
    # an HH-looking file forced to 'standard' needs a prompt column -> missing column error
    with pytest.raises(DataError, match="missing column 'prompt'"):
        prep(tmp_path, [{"path": str(FIX / "hh.jsonl"), "format": "standard"}])


def test_metadata_repr_is_parsed_safely():
    assert parse_metadata_scores("{'score_chosen': 9.0, 'score_rejected': 8.0}", "metadata") == (9.0, 8.0)
    assert parse_metadata_scores('{"score_chosen": 1, "score_rejected": "0.5"}', "metadata") == (1.0, 0.5)
    assert parse_metadata_scores({"other": 1}, "metadata") == (None, None)
    with pytest.raises(DataError, match="cannot parse metadata"):
        parse_metadata_scores("__import__('os').system('echo pwned')", "metadata")


def test_hub_source_calls_load_dataset(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name=None, split=None, revision=None, data_files=None, cache_dir=None):
        calls.append((path, name, split, revision))
        n = 3 if split == "train_prefs" else 2
        return datasets.Dataset.from_list(
            [
                {
                    "prompt": f"{split} {i}?",
                    "chosen": [U(f"{split} {i}?"), A("yes")],
                    "rejected": [U(f"{split} {i}?"), A("no")],
                }
                for i in range(n)
            ]
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    src = {
        "path": "trl-lib/ultrafeedback_binarized",
        "name": "default",
        "split": "train_prefs",
        "test_split": "test_prefs",
        "revision": "abc123",
    }
    stats, train, test = prep(tmp_path, [src])
    assert calls == [
        ("trl-lib/ultrafeedback_binarized", "default", "train_prefs", "abc123"),
        ("trl-lib/ultrafeedback_binarized", "default", "test_prefs", "abc123"),
    ]
    assert len(train) == 3 and len(test) == 2
    assert train[0]["origin"] == "trl-lib/ultrafeedback_binarized[train_prefs]:0"
    assert test[1]["prompt"] == [U("test_prefs 1?")]
    assert set(only_source(stats)["inputs"]) == {"train_prefs", "test_prefs"}


def test_synthetic_source_keeps_generator_rows(tmp_path):
    from orpo_core.data.synthetic.arithmetic import generate_arithmetic

    stats, train, test = prep(tmp_path, [{"synthetic": {"n_rows": 40, "seed": 7}}], dedup=False)
    expected = generate_arithmetic(40, 7)
    assert [r["prompt"] for r in train] == [e["prompt"] for e in expected]
    assert [r["source"] for r in train] == [e["source"] for e in expected]
    assert train[5]["origin"] == "synthetic:arithmetic:5"
    assert only_source(stats)["format"] == "synthetic"

"""The markdown / table builders of the Prefect UI (tasks/ui.py, the sweep report, the model card,
the abandoned-progress mark): pure functions, no Prefect server."""

from __future__ import annotations

import base64
import io

import pytest

from tasks import ui

EVAL = {
    "settings": {"n_pairs": 157, "bootstrap_samples": 200},
    "results": {
        "trained": {"preference/accuracy": 0.45, "perplexity/chosen": 44.8, "preference/margin": -0.004},
        "base": {"preference/accuracy": 0.37, "perplexity/chosen": 252.2, "preference/margin": -0.002},
    },
    "metrics": {
        "trained": {
            "preference/accuracy": {"value": 0.45, "n": 157, "ci95": [0.37, 0.52]},
            "perplexity/chosen": {"value": 44.8, "n": 157, "ci95": [42.1, 47.4]},
            "preference/margin": {"value": -0.004, "n": 157, "ci95": [-0.007, -0.002]},
        },
        "base": {
            "preference/accuracy": {"value": 0.37, "n": 157, "ci95": [0.29, 0.44]},
            "perplexity/chosen": {"value": 252.2, "n": 157, "ci95": [249.0, 256.0]},
            "preference/margin": {"value": -0.002, "n": 157, "ci95": [-0.004, -0.0015]},
        },
    },
    "delta_details": {
        "preference/accuracy": {"value": 0.08, "ci95": [-0.03, 0.2]},
        "perplexity/chosen": {"value": -207.4, "ci95": [-210.0, -205.0]},
        "preference/margin": {"value": -0.002, "ci95": [-0.0035, -0.0008]},
    },
    "generations": [{"prompt": "What is 4 + 3?", "base": "", "trained": "7 | seven\nok"}],
}


def test_verdict_follows_interval_and_direction():
    assert ui.verdict((0.01, 0.2), "max") == "better"
    assert ui.verdict((0.01, 0.2), "min") == "worse"
    assert ui.verdict((-0.2, -0.01), "min") == "better"
    assert ui.verdict((-0.1, 0.1), "max") == "within noise"
    assert ui.verdict(None, "max") == "no interval"
    assert ui.verdict((0.1, 0.2), None) == "higher"
    assert ui.direction("perplexity/chosen") == "min" and ui.direction("lm_eval/x/acc", {"higher_is_better": True}) == "max"


def test_compare_orders_base_trained_change_with_paired_intervals():
    rows = {r.metric: r for r in ui.compare(EVAL)}
    acc = rows["preference/accuracy"]
    assert (acc.base, acc.trained, acc.change, acc.change_ci, acc.paired) == (0.37, 0.45, 0.08, (-0.03, 0.2), True)
    assert acc.verdict == "within noise"
    assert rows["perplexity/chosen"].verdict == "better"  # lower perplexity, interval clear of 0
    assert rows["preference/margin"].verdict == "worse"
    md = ui.comparison_markdown(list(rows.values()), "preference/accuracy")
    assert md.splitlines()[0] == "| metric | base [95 % CI] | trained [95 % CI] | change [95 % CI] | verdict |"
    assert "| `preference/accuracy` (gate) | 0.37 [0.29, 0.44] | 0.45 [0.37, 0.52] | +0.08 [-0.03, 0.2] | within noise |" in md
    assert "| `perplexity/chosen` | 252.2 [249, 256] | 44.8 [42.1, 47.4] | -207.4 [-210, -205] | better |" in md
    # without a paired delta: the difference, no interval, no verdict beyond that
    no_delta = {**EVAL, "delta_details": {}}
    r = ui.compare(no_delta, ["preference/accuracy"])[0]
    assert r.change == pytest.approx(0.08) and r.change_ci is None and r.verdict == "no interval"
    # only the metrics asked for, in that order, and only measured ones
    assert [r.metric for r in ui.compare(EVAL, ["perplexity/chosen", "nope", "preference/accuracy"])] == [
        "perplexity/chosen", "preference/accuracy"]


def _png(width: int, height: int) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    ax = fig.subplots()
    ax.plot(range(100), [i * i for i in range(100)])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def test_png_data_uri_downscales_and_stays_small(tmp_path):
    from PIL import Image

    p = tmp_path / "curves.png"
    p.write_bytes(_png(1800, 500))
    uri = ui.png_data_uri(p, max_width_px=900)
    assert uri.startswith("data:image/png;base64,")
    raw = base64.b64decode(uri.split(",", 1)[1])
    with Image.open(io.BytesIO(raw)) as im:
        assert im.size == (900, 250)
    assert len(raw) < 60_000 and len(raw) < p.stat().st_size
    assert ui.png_data_uri(tmp_path / "missing.png") is None
    (tmp_path / "bad.png").write_text("not an image")
    assert ui.png_data_uri(tmp_path / "bad.png") is None
    assert ui.png_data_uri(p, max_bytes=100) is None
    assert ui.image_markdown(p, "curves", max_bytes=100) == f"*curves: `{p}` (not embedded)*"
    assert ui.image_markdown(p, "curves").startswith("![curves](data:image/png;base64,")


def test_png_data_uri_puts_transparent_figures_on_white(tmp_path):
    """A transparent PNG (``savefig(transparent=True)``) must not become black on black in the dark UI."""
    from PIL import Image, ImageDraw

    im = Image.new("RGBA", (400, 100), (0, 0, 0, 0))
    ImageDraw.Draw(im).line([(0, 50), (399, 50)], fill=(0, 0, 0, 255), width=4)
    p = tmp_path / "transparent.png"
    im.save(p)
    uri = ui.png_data_uri(p)
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as out:
        rgb = out.convert("RGB")
        assert rgb.getpixel((10, 10)) == (255, 255, 255)  # background: white, not black
        assert max(rgb.getpixel((200, 50))) < 64  # the line stays dark


def test_eval_and_samples_markdown(tmp_path):
    p = tmp_path / "curves.png"
    p.write_bytes(_png(600, 200))
    md = ui.eval_markdown(EVAL, "run", "preference/accuracy", p)
    assert "(200 resamples, 157 held-out pairs)" in md and "![training curves](data:image/png;base64," in md
    s = ui.samples_markdown(EVAL, "run")
    assert "| prompt | base | trained |" in s and "| What is 4 + 3? | *(empty)* | 7 \\| seven<br>ok |" in s
    assert ui.samples_markdown({"generations": []}, "run") == ""


def test_stats_tables():
    stats = {
        "rows_read": 3000, "pairs_added_by_binarize": 0, "rows_kept": 1574, "dropped": {"duplicate": 1426}, "dropped_total": 1426,
        "splits": {"train": {"rows": 1417, "by_source": {"s": 1417}, "multi_turn": 0, "with_system": 0, "with_scores": 3},
                   "test": {"rows": 157, "by_source": {"s": 157}, "multi_turn": 0, "with_system": 0, "with_scores": 0}},
        "sources": {"s": {"format": "jsonl", "read": 3000, "kept": 1574, "dropped_total": 1426, "outputs": {"train": 1417, "test": 157},
                          "inputs": {"train": {"dropped": {"duplicate": 1400}}, "test": {"dropped": {"duplicate": 26}}}}},
        "tokenization": {
            "max_length": 128, "max_prompt_length": 64, "truncation": "left",
            "train": {"rows_in": 1417, "rows_out": 1416, "dropped": {"too_long": 1}, "prompt_truncated": 2, "completion_truncated": 0,
                      "tokens": 87859, "lengths": {"prompt": {"p50": 45, "p90": 52, "max": 54, "mean": 43.43}}},
        },
    }
    d = ui.data_stats_markdown(stats, "run")
    assert "| 3000 | 0 | 1574 | 1426 |" in d
    assert "| train | 1417 | 0 | 0 | 3 | s: 1417 |" in d
    assert "| reason | test input | train input | total |" in d and "| `duplicate` | 26 | 1400 | 1426 |" in d
    t = ui.tokenization_markdown(stats, "run")
    assert "| train | 1417 | 1416 | 1 | 2 | 0 | 87859 |" in t
    assert "| split | field | p50 | p90 | max | mean |" in t and "| train | prompt | 45 | 52 | 54 | 43.43 |" in t


def test_train_metrics_rows_no_doubled_prefix():
    m = {"train": {"train_loss": 4.04, "epoch": 2.0, "total_flos": 1.431e12}, "eval": {"eval_loss": 3.19, "epoch": 2.0},
         "last_train_log": {"loss": 3.4}, "global_step": 178, "num_train_pairs": 1417, "peft": "none"}
    rows = {r["metric"]: r["value"] for r in ui.train_metrics_rows(m)}
    assert rows == {"train_loss": 4.04, "epoch": 2.0, "total_flos": 1.431e12, "eval_loss": 3.19, "eval.epoch": 2.0,
                    "global_step": 178, "num_train_pairs": 1417}
    from tasks.artifacts import readable_rows

    shown = {r["metric"]: r["value"] for r in readable_rows(ui.train_metrics_rows(m))}
    assert shown["epoch"] == 2 and isinstance(shown["epoch"], int) and shown["total_flos"] == "1.431e+12"
    assert shown["train_loss"] == 4.04


def test_run_summary_links_cached_stages():
    lines = [ui.StageLine("prepare", "Cached", "quickstart-20261205-120000", "http://ui/runs/flow-run/abc"),
             ui.StageLine("tokenize", "Cached"), ui.StageLine("train", "Completed")]
    md = ui.run_summary_markdown("quickstart", "/tmp/x", lines, EVAL, "preference/accuracy", "max",
                                 {"train": {"train_loss": 4.0}, "eval": {"eval_loss": 3.0}, "global_step": 30})
    assert "| prepare | Cached | [quickstart-20261205-120000](http://ui/runs/flow-run/abc) |" in md
    assert "| tokenize | Cached | an earlier run (not recorded) |" in md and "| train | Completed | this run |" in md
    assert "Output folder: `/tmp/x`" in md
    assert "| `preference/accuracy` (gate) | 0.37 [0.29, 0.44] | 0.45 [0.37, 0.52] | +0.08 [-0.03, 0.2] | within noise |" in md
    assert "Final training: `train_loss` 4, `eval_loss` 3, `global_step` 30" in md


def test_sweep_best_only_when_separated_and_base_row():
    from flows.sweep import change_vs_base, distinguishable_best, point_label, sweep_table

    rows = [
        {"point": "b0.05", "label": "beta=0.05", "orpo.beta": 0.05, "preference/accuracy": 0.8153, "preference/accuracy ci": (0.75, 0.87),
         "preference/accuracy change": 0.1, "preference/accuracy change ci": (0.05, 0.15), "status": "ok"},
        {"point": "b0.1", "label": "beta=0.1", "orpo.beta": 0.1, "preference/accuracy": 0.8025, "preference/accuracy ci": (0.74, 0.86), "status": "ok"},
    ]
    best, sentence = distinguishable_best(rows, "preference/accuracy", "max")
    assert best is None and sentence.startswith("no point is distinguishable from the others")
    rows[1]["preference/accuracy ci"] = (0.6, 0.7)
    best, sentence = distinguishable_best(rows, "preference/accuracy", "max")
    assert best == "b0.05" and "**beta=0.05**" in sentence
    assert distinguishable_best(rows, "perplexity/chosen", "min")[0] is None
    base = {"preference/accuracy": 0.7153, "preference/accuracy ci": (0.66, 0.77)}
    assert change_vs_base(rows[0], "preference/accuracy", base) == (0.1, (0.05, 0.15), True)
    ch, ci, paired = change_vs_base(rows[1], "preference/accuracy", base)
    assert not paired and ch == pytest.approx(0.0872) and ci[1] - ci[0] == pytest.approx(2 * (0.05**2 + 0.055**2) ** 0.5)
    md = sweep_table(rows, "preference/accuracy", ["orpo.beta"], base, "b0.05")
    head, _, base_line, first, second = md.strip().splitlines()
    assert head == "| point | beta | acc [95 % CI] | Δ acc vs base | margin | ppl | train loss | eval loss |"  # all ok: no status
    assert base_line.startswith("| base model | – | 0.7153 [0.66, 0.77] | – |")
    assert first.startswith("| beta=0.05 | 0.05 | 0.8153 [0.75, 0.87] | +0.1 [0.05, 0.15] |")
    assert second.startswith("| beta=0.1 | 0.1 | 0.8025 [0.6, 0.7] | ≈ +0.0872 [")
    rows[1]["status"] = "train failed: boom | x"
    md = sweep_table(rows, "preference/accuracy", ["orpo.beta"], base, "b0.05")
    assert md.splitlines()[0].endswith("| eval loss | status |") and md.strip().endswith("| train failed: boom \\| x |")
    assert point_label({"orpo.beta": 0.05}) == "beta=0.05"
    assert point_label({"orpo.alpha": 0.5, "orpo.beta": 0.05}) == "alpha=0.5, beta=0.05"
    assert point_label({"orpo.beta": 0.1, "x.beta": 1}) == "orpo.beta=0.1, x.beta=1"


def test_abandoned_progress_description():
    from flows.runs import abandoned_progress_description

    desc = "Training progress of q\n\n| | |\n|---|---|\n| step | 5 / 178 |\n| ETA | 41m 00s |"
    marked = abandoned_progress_description(desc, "Crashed", 2.8, "quickstart-20261205")
    assert marked.startswith("**CRASHED at step 5 / 178**: flow run quickstart-20261205 ended Crashed before training finished.")
    assert marked.endswith(desc)
    assert abandoned_progress_description(marked, "Cancelled") == marked  # marked once
    assert abandoned_progress_description("no table", "Cancelled", 12.0).startswith("**CANCELLED at 12 %**")


def test_model_card_final_metrics_and_embedded_curves():
    from orpo_core.publish.card import card_for_ui, final_metric_rows

    rows = final_metric_rows({"train": {"train_runtime": 5.0, "train_loss": 4.04, "epoch": 2.0, "total_flos": 1e12},
                              "eval": {"eval_loss": 3.19, "epoch": 2.0}, "global_step": 178.0, "num_train_pairs": 1417})
    assert [k for k, _ in rows] == ["train_loss", "eval_loss", "epoch", "global_step", "num_train_pairs"]
    from orpo_core.io import fmt_value

    assert [fmt_value(v) for _, v in rows] == ["4.04", "3.19", "2", "178", "1417"]
    card = "# m\n\ntext\n\n![training curves](training_curves.png)\n"
    assert "*training curves: `training_curves.png` in the model folder*" in card_for_ui(card)
    assert "![training curves](data:image/png;base64,AAAA)" in card_for_ui(card, {"training_curves.png": "data:image/png;base64,AAAA"})


@pytest.mark.prefect
def test_progress_of_a_crashed_run_is_marked_at_next_start(prefect_harness):
    from prefect import flow
    from prefect.artifacts import create_progress_artifact
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    from flows.runs import mark_unfinished_progress

    desc = "Training progress of t\n\n| | |\n|---|---|\n| step | 5 / 178 |"

    @flow
    def training(key: str) -> str:
        return str(create_progress_artifact(progress=2.8, key=key, description=desc))

    @flow
    def next_run(key: str) -> list[str]:
        return mark_unfinished_progress(key)

    crashed = training("uitest-crashed-progress", return_state=True)
    finished = training("uitest-finished-progress", return_state=True)
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(crashed.state_details.flow_run_id, Crashed(message="killed"), force=True)
    assert next_run("uitest-crashed-progress") == [crashed.result()]
    assert next_run("uitest-finished-progress") == []  # its flow run completed: left alone
    assert next_run("uitest-crashed-progress") == []  # marked once
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    keys = ["uitest-crashed-progress", "uitest-finished-progress"]
    with get_client(sync_client=True) as client:  # by key: the session's server holds more than one page of artifacts
        marked = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    by_id = {str(a.id): a for a in marked}
    assert by_id[crashed.result()].description.startswith("**CRASHED at step 5 / 178**: flow run ")
    assert by_id[crashed.result()].description.endswith(desc) and float(by_id[crashed.result()].data) == 2.8
    assert by_id[finished.result()].description == desc

"""The export stage: `orpo export RECIPE --gguf ...` / export_flow as a cached Prefect task, and
hub.gguf making the push stage ship the GGUF files with the model card listing them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from gguf_helpers import build_tiny_llama


@pytest.fixture(scope="module")
def llama_src(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("export-src") / "model")


def _run(tmp_path: Path, llama_src: Path, gguf: list[str]) -> Path:
    out = tmp_path / "run"
    shutil.copytree(llama_src, out / "train" / "model")
    recipe = {
        "run_name": "tiny-export",
        "output_dir": str(out),
        "model": {"name_or_path": str(llama_src), "dtype": "float32"},
        "data": {"sources": [{"synthetic": {"task": "arithmetic", "n_rows": 10}}]},
        "hub": {"repo_id": "someone/tiny-export", "gguf": gguf},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def test_export_flow_cached_and_rerun_on_new_types(prefect_harness, llama_src, tmp_path):
    from flows.pipeline import export_flow

    recipe = _run(tmp_path, llama_src, [])
    export_dir = tmp_path / "run" / "export"
    first = export_flow(recipe=str(recipe), quantizations=["f16", "q8_0"])
    assert first["stages"] == {"export": "Completed"}
    assert sorted(p.name for p in export_dir.glob("*.gguf")) == ["tiny-export.F16.gguf", "tiny-export.Q8_0.gguf"]
    assert [f["quantization"] for f in first["files"]] == ["f16", "q8_0"]
    again = export_flow(recipe=str(recipe), quantizations=["f16", "q8_0"])
    assert again["stages"] == {"export": "Cached"} and again["files"] == first["files"]
    only_q8 = export_flow(recipe=str(recipe), quantizations=["q8_0"])
    assert only_q8["stages"] == {"export": "Completed"}
    assert sorted(p.name for p in export_dir.glob("*.gguf")) == ["tiny-export.Q8_0.gguf"]  # the stale f16 is removed
    # a changed model folder is a cache miss
    (tmp_path / "run" / "train" / "model" / "generation_config.json").write_text('{"do_sample": false}', encoding="utf-8")
    assert export_flow(recipe=str(recipe), quantizations=["q8_0"])["stages"] == {"export": "Completed"}


def test_push_with_hub_gguf_ships_the_files_and_card_lists_them(prefect_harness, llama_src, tmp_path):
    from flows.pipeline import push_flow

    recipe = _run(tmp_path, llama_src, ["q8_0"])
    res = push_flow(recipe=str(recipe), dry_run=True)
    assert res["stages"] == {"export": "Completed", "push": "Completed"}
    hub = tmp_path / "run" / "hub"
    gguf = hub / "tiny-export.Q8_0.gguf"
    assert gguf.is_file() and gguf.stat().st_size == (tmp_path / "run" / "export" / gguf.name).stat().st_size
    card = (hub / "README.md").read_text(encoding="utf-8")
    size_mb = f"{gguf.stat().st_size / 1e6:.1f} MB"
    assert f"| `tiny-export.Q8_0.gguf` | Q8_0 | {size_mb} |" in card
    assert "llama-cli -m tiny-export.Q8_0.gguf" in card and "FROM ./tiny-export.Q8_0.gguf" in card
    assert 'TEMPLATE """<|im_start|>system\n{{ .System }}<|im_end|>\n<|im_start|>user\n{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n{{ .Response }}<|im_end|>"""' in card
    assert 'PARAMETER stop "<|im_end|>"' in card
    assert "- gguf" in card.split("---")[1]  # tag in the front matter


@pytest.mark.parametrize("name", ["chatml", "llama3", "zephyr", "mistral", "gemma"])
def test_ollama_template_reproduces_the_chat_template(name):
    """Substituting Ollama's variables in the Modelfile TEMPLATE gives the tokenizer's own rendering."""
    from orpo_core.models.chat_templates import NAMED_TEMPLATES, apply_chat_template_setting
    from orpo_core.publish.card import ollama_template
    from gguf_helpers import build_bpe_tokenizer

    tok = build_bpe_tokenizer()
    apply_chat_template_setting(tok, name)
    tpl, has_system = ollama_template(NAMED_TEMPLATES[name].template, bos_token=tok.bos_token, eos_token=tok.eos_token)
    assert has_system == (name not in ("mistral", "gemma"))
    msgs = ([{"role": "system", "content": "Be brief."}] if has_system else []) + [{"role": "user", "content": "Hi there"}]
    rendered = tpl.replace("{{ .System }}", "Be brief.").replace("{{ .Prompt }}", "Hi there").replace("{{ .Response }}", "Hello")
    assert rendered == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + "Hello" + tok.eos_token


def test_cli_rejects_unknown_type(tmp_path, llama_src):
    from typer.testing import CliRunner

    from flows.cli import app

    recipe = _run(tmp_path, llama_src, [])
    res = CliRunner().invoke(app, ["export", str(recipe), "--gguf", "f16,q4_k"])
    assert res.exit_code == 2 and "unknown GGUF type 'q4_k'" in res.output


def test_recipe_hub_gguf_is_validated():
    from orpo_core.config import RecipeError, recipe_from_dict

    base = {"data": {"sources": [{"synthetic": {"task": "arithmetic", "n_rows": 10}}]}}
    assert recipe_from_dict({**base, "hub": {"gguf": ["Q8_0", "f16"]}}).hub.gguf == ["q8_0", "f16"]
    with pytest.raises(RecipeError, match=r"hub.gguf: .*unknown GGUF type 'q4'"):
        recipe_from_dict({**base, "hub": {"gguf": ["q4"]}})

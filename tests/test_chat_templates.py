"""Named chat templates and .jinja files (model.chat_template): the prompt/completion boundary of
the tokenized pairs is right for every named template (one BOS, the end-of-turn token once, at
the end of each completion), the template travels with the saved tokenizer, bad settings fail
naming the key."""

from __future__ import annotations


import pyarrow as pa
import pytest

from orpo_core.models.chat_templates import NAMED_TEMPLATES, ChatTemplateError, apply_chat_template_setting
from orpo_core.config import RecipeError, recipe_from_dict
from orpo_core.data.tokenize import tokenize_table

TEXTS = ["Tell me two facts about bees.", "Bees make honey.\nBees live in hives.", "No.", "What is 12 + 30?", "42"]


def _bos_tokenizer():
    """A byte-level BPE tokenizer that prepends BOS ``<s>`` to ordinary encodings (as Llama's),
    eos ``</s>``, no pad and no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(TEXTS * 10, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<s>", "</s>", "<unk>"], show_progress=False
    ))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _pairs(n: int = 4) -> pa.Table:
    triples = [(TEXTS[0], TEXTS[1], TEXTS[2]), (TEXTS[3], TEXTS[4], TEXTS[2])]
    rows = []
    for i in range(n):
        prompt, chosen, rejected = triples[i % 2]
        rows.append({
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "source": "t",
        })
    return pa.Table.from_pylist(rows)


@pytest.mark.parametrize("name", sorted(NAMED_TEMPLATES))
def test_prompt_completion_boundary(name):
    tok = _bos_tokenizer()
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # the tokenizer prepends BOS
    apply_chat_template_setting(tok, name)
    spec = NAMED_TEMPLATES[name]
    end = spec.end_of_turn or "</s>"
    end_id = tok.convert_tokens_to_ids(end)
    assert tok.eos_token == end and tok.pad_token is not None
    for t in spec.special_tokens:  # control tokens are single special tokens
        assert t in tok.all_special_tokens and len(tok(t, add_special_tokens=False)["input_ids"]) == 1
    table = _pairs()
    out, stats = tokenize_table(table, tok, max_length=256, max_prompt_length=128)
    assert stats["rows_out"] == table.num_rows and stats["prefix_fallback"] == 0 and stats["template_prefix_mismatch"] == 0
    for row, src in zip(out.to_pylist(), table.to_pylist()):
        p = row["prompt_input_ids"]
        assert p[0] == tok.bos_token_id and p.count(tok.bos_token_id) == 1, (name, tok.convert_ids_to_tokens(p))
        # every prompt turn ends with the end token, except Mistral's ([INST] ... [/INST])
        assert p.count(end_id) == (0 if name == "mistral" else len(src["prompt"])), (name, tok.convert_ids_to_tokens(p))
        for which in ("chosen", "rejected"):
            c = row[f"{which}_input_ids"]
            assert c.count(end_id) == 1, (name, which, tok.convert_ids_to_tokens(c))
            assert end_id in c[-2:]  # the turn's end token (a trailing newline may follow)
            assert tok.bos_token_id not in c
            full = tok.apply_chat_template(src["prompt"] + src[which], tokenize=False)
            expected = full if full.startswith(tok.bos_token) else tok.bos_token + full
            assert tok.decode(p + c) == expected


@pytest.mark.parametrize("name", ["mistral", "gemma"])
def test_templates_without_system_role_refuse_it(name):
    from orpo_core.data.errors import DataError

    tok = _bos_tokenizer()
    apply_chat_template_setting(tok, name)
    table = pa.Table.from_pylist([{
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello"}],
        "rejected": [{"role": "assistant", "content": "No"}],
        "source": "t",
    }])
    with pytest.raises(DataError, match="(?i)role"):
        tokenize_table(table, tok, max_length=64, max_prompt_length=32, file="pairs.parquet")


def test_jinja_file_through_load_tokenizer_and_saved_with_model(tmp_path, monkeypatch):
    from orpo_core.models.chat import load_tokenizer

    folder = tmp_path / "tok"
    _bos_tokenizer().save_pretrained(folder)
    tpl = tmp_path / "mine.jinja"
    tpl.write_text("{% for m in messages %}{{ '### ' + m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '### assistant: ' }}{% endif %}", encoding="utf-8")
    recipe = recipe_from_dict({
        "model": {"name_or_path": str(folder), "chat_template": str(tpl)},
        "data": {"sources": [{"synthetic": {"task": "arithmetic", "n_rows": 10}}]},
    })
    tok, added = load_tokenizer(recipe.model, tmp_path)
    assert not added and tok.chat_template == tpl.read_text(encoding="utf-8")
    tok.save_pretrained(tmp_path / "model")  # what save_trained_model does
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(str(tmp_path / "model"))
    assert again.chat_template == tok.chat_template
    assert again.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True) == (
        "### user: Hi</s>### assistant: "
    )


def test_named_template_through_load_tokenizer(tmp_path):
    from orpo_core.models.chat import load_tokenizer

    folder = tmp_path / "tok"
    _bos_tokenizer().save_pretrained(folder)
    recipe = recipe_from_dict({
        "model": {"name_or_path": str(folder), "chat_template": "llama3"},
        "data": {"sources": [{"synthetic": {"task": "arithmetic", "n_rows": 10}}]},
    })
    tok, added = load_tokenizer(recipe.model, tmp_path)
    assert added and tok.eos_token == "<|eot_id|>" and tok.chat_template == NAMED_TEMPLATES["llama3"].template


@pytest.mark.parametrize(
    "value, message",
    [
        ("llama2", r"model.chat_template: .*unknown chat template 'llama2'.*chatml, llama3, zephyr, mistral, gemma"),
        ("missing/template.jinja", r"model.chat_template: .*chat template file 'missing/template.jinja' not found"),
    ],
)
def test_bad_settings_name_the_key(value, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict({"model": {"name_or_path": "tiny", "chat_template": value},
                          "data": {"sources": [{"synthetic": {"task": "arithmetic", "n_rows": 10}}]}})


def test_broken_jinja_file_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}\n{{ m['content'] }\n", encoding="utf-8")
    with pytest.raises(ChatTemplateError, match=r"bad.jinja', line 2"):
        apply_chat_template_setting(_bos_tokenizer(), str(bad))


def test_recipe_names_are_the_named_templates():
    from orpo_core.config import CHAT_TEMPLATE_NAMES
    from orpo_core.models.chat_templates import NAMED_TEMPLATES

    assert tuple(NAMED_TEMPLATES) == CHAT_TEMPLATE_NAMES

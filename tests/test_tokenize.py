"""Chat templates (orpo_core.models.chat) and the tokenization stage (orpo_core.data.tokenize)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orpo_core.models.chat import TokenizerLoadError, load_tokenizer, setup_chat_format
from orpo_core.config import ModelConfig, recipe_from_dict
from orpo_core.data.errors import DataError
from orpo_core.data.schema import pairs_to_table, write_pairs
from orpo_core.data.tokenize import (
    TOKENIZED_SCHEMA,
    check_tokenizer_matches,
    load_tokenized,
    tokenize_dataset,
    tokenize_table,
    tokenizer_fingerprint,
    truncate_pair,
)
from orpo_core.models.chatml import CHATML_TEMPLATE
from orpo_core.models.tiny import _bytes_to_unicode, build_tiny_tokenizer


# --------------------------------------------------------------------------- helpers
def byte_tokenizer(merges=(), template=None, bos_post=False):
    """Byte-level BPE tokenizer WITHOUT chat template (a 'base model' tokenizer).

    ``merges``: extra BPE merges (pairs of single characters); ``bos_post``: the
    tokenizer prepends ``<s>`` on ordinary encodings, like Llama's.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(_bytes_to_unicode().values())}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    for special in ("<s>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    if bos_post:
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="<|endoftext|>")
    if template is not None:
        tok.chat_template = template
    return tok


def gpt2_plain(shared_data: Path):
    """GPT-2 BPE from shared data, as a base model's tokenizer: no template, no pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = shared_data / "tokenizers" / "gpt2"
    tk = Tokenizer(models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


def msg(role, content):
    return {"role": role, "content": content}


def row(prompt, chosen, rejected, origin="mem:0", source="src"):
    if isinstance(prompt, str):
        prompt = [msg("user", prompt)]
    return {
        "prompt": prompt,
        "chosen": [msg("assistant", chosen)],
        "rejected": [msg("assistant", rejected)],
        "source": source,
        "score_chosen": None,
        "score_rejected": None,
        "origin": origin,
    }


def run_table(rows, tok, max_length=4096, max_prompt_length=2048, **kw):
    return tokenize_table(pairs_to_table(rows), tok, max_length=max_length, max_prompt_length=max_prompt_length, file="mem.parquet", **kw)


def chatml_rows():
    return [
        row("What is 2 + 2?", "4", "5", "mem:0"),
        row(
            [msg("system", "You are terse."), msg("user", "Name a colour."), msg("assistant", "Red."), msg("user", "Another one, héhé ✓")],
            "Blue.",
            "I refuse to answer that.",
            "mem:1",
        ),
        row([msg("system", "Sys only then user"), msg("user", "  spaces  \n\n newline ")], "ok\n", " leading space", "mem:2"),
    ]


# --------------------------------------------------------------------------- chat.py
def test_setup_chat_format_adds_chatml_to_base_tokenizer():
    tok = byte_tokenizer()
    n0, bos = len(tok), tok.bos_token
    assert tok.chat_template is None and tok.pad_token is None
    assert setup_chat_format(tok) is True
    assert len(tok) == n0 + 2
    assert tok.chat_template == CHATML_TEMPLATE
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|im_end|>"
    assert tok.bos_token == bos  # BOS deliberately left alone (see chat.py docstring)
    ids = tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tok.eos_token_id
    assert len(ids) == 1 + 5 + 2 + 1  # control tokens are single ids, text is one id per byte
    # a template is present now: refuse unless overwriting; overwriting adds nothing new
    with pytest.raises(TokenizerLoadError, match="already has a chat template"):
        setup_chat_format(tok)
    assert setup_chat_format(tok, overwrite=True) is False and len(tok) == n0 + 2


def test_setup_chat_format_keeps_existing_pad():
    tok = byte_tokenizer()
    tok.pad_token = "<s>"
    setup_chat_format(tok)
    assert tok.pad_token == "<s>" and tok.eos_token == "<|im_end|>"


def test_load_tokenizer_modes(tmp_path, tiny_model_dir):
    plain = tmp_path / "plain"
    byte_tokenizer().save_pretrained(plain)
    custom = tmp_path / "custom"
    tpl = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    byte_tokenizer(template=tpl).save_pretrained(custom)

    tok, added = load_tokenizer(ModelConfig(name_or_path=str(plain)), tmp_path)
    assert added and tok.chat_template == CHATML_TEMPLATE and tok.pad_token == "<|im_end|>"

    tok, added = load_tokenizer(ModelConfig(name_or_path=str(custom)), tmp_path)  # auto keeps its template
    assert not added and tok.chat_template == tpl
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"  # pad fallback to eos

    tok, added = load_tokenizer(ModelConfig(name_or_path=str(custom), chat_template="chatml"), tmp_path)
    assert added and tok.chat_template == CHATML_TEMPLATE

    tok, added = load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir), chat_template="chatml"), tmp_path)
    assert not added and tok.pad_token == "<|pad|>"  # already ChatML: nothing to add

    tok, added = load_tokenizer(ModelConfig(name_or_path="tiny:x", tokenizer=str(custom), chat_template="model"), tmp_path)
    assert not added and tok.chat_template == tpl  # model.tokenizer overrides the model path

    with pytest.raises(TokenizerLoadError, match="has no chat template.*chat_template: model") as e:
        load_tokenizer(ModelConfig(name_or_path=str(plain), chat_template="model"), tmp_path)
    assert str(plain) in str(e.value)
    with pytest.raises(TokenizerLoadError, match="does not exist") as e:
        load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "nope" / "model")), tmp_path)
    assert str(tmp_path / "nope" / "model") in str(e.value)
    with pytest.raises(TokenizerLoadError, match="no-such-org/no-such-model"):
        load_tokenizer(ModelConfig(name_or_path="no-such-org/no-such-model", revision="v1"), tmp_path)


# --------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("kind", ["char", "plain+chatml"])
def test_prompt_plus_completion_decodes_to_rendered_chat(kind):
    if kind == "char":
        tok = build_tiny_tokenizer("char")
    else:
        tok = byte_tokenizer(merges=[("a", "b")])
        assert setup_chat_format(tok)
    rows = chatml_rows()
    out, st = run_table(rows, tok)
    assert st["rows_in"] == st["rows_out"] == 3 and st["prefix_fallback"] == 0 and st["template_prefix_mismatch"] == 0
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for r, t in zip(rows, out.to_pylist()):
        p, c, rj = t["prompt_input_ids"], t["chosen_input_ids"], t["rejected_input_ids"]
        assert tok.decode(p) == tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
        full_c = tok.apply_chat_template(r["prompt"] + r["chosen"], tokenize=False)
        full_r = tok.apply_chat_template(r["prompt"] + r["rejected"], tokenize=False)
        assert tok.decode(p + c) == full_c and tok.decode(p + rj) == full_r
        # exactly the tokenization of the whole conversation (ChatML boundaries are control tokens)
        assert p + c == tok(full_c, add_special_tokens=False)["input_ids"]
        # completion = content + end-of-turn token + the template's newline
        assert tok.decode(c) == r["chosen"][0]["content"] + "<|im_end|>\n"
        assert end in c and c[-2] == end
    assert out.schema.equals(TOKENIZED_SCHEMA)


def test_real_gpt2_tokenizer_on_ultrafeedback_rows(shared_data, monkeypatch):
    """GPT-2 BPE (no template) + ChatML on real UltraFeedback rows; 2 processes give the same bytes as 1."""
    import orpo_core.data.tokenize as T

    tok = gpt2_plain(shared_data)
    assert setup_chat_format(tok) is True and len(tok) == 50259
    rows = []
    with open(shared_data / "preference" / "ultrafeedback_binarized_sample_train.jsonl", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i == 40:
                break
            d = json.loads(line)
            rows.append(row(d["prompt"], d["chosen"], d["rejected"], origin=f"uf:{i + 1}"))
    out1, st1 = run_table(rows, tok, max_length=100_000, max_prompt_length=50_000)
    assert st1["rows_out"] == 40 and st1["prompt_truncated"] == st1["completion_truncated"] == 0
    for r, t in zip(rows, out1.to_pylist()):
        full = tok.apply_chat_template(r["prompt"] + r["chosen"], tokenize=False)
        assert tok.decode(t["prompt_input_ids"] + t["chosen_input_ids"]) == full
    monkeypatch.setattr(T, "ROWS_PER_PROC", 10)
    out2, st2 = run_table(rows, tok, max_length=100_000, max_prompt_length=50_000, num_proc=2, batch_size=8)
    assert out2.equals(out1) and st2 == st1


def test_prefix_fallback_when_boundary_tokens_merge():
    # generation prompt ends with "a", the answer starts with "b": BPE merges "ab" across the boundary
    tpl = (
        "{% for m in messages %}{% if m['role'] == 'user' %}Q:{{ m['content'] }}\n{% else %}Aa{{ m['content'] }}|{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Aa{% endif %}"
    )
    tok = byte_tokenizer(merges=[("a", "b")], template=tpl)
    rows = [row("hi", "bcd", "xyz", "mem:0")]
    out, st = run_table(rows, tok)
    assert st["prefix_fallback"] == 1 and st["rows_out"] == 1
    t = out.to_pylist()[0]
    full_c = tok.apply_chat_template(rows[0]["prompt"] + rows[0]["chosen"], tokenize=False)
    assert full_c == "Q:hi\nAabcd|"
    assert tok.decode(t["prompt_input_ids"]) == "Q:hi\nAa"
    assert tok.decode(t["prompt_input_ids"] + t["chosen_input_ids"]) == full_c
    assert t["chosen_input_ids"] == tok("bcd|", add_special_tokens=False)["input_ids"]
    assert tok.decode(t["rejected_input_ids"]) == "xyz|"


def test_template_whose_generation_prompt_is_not_a_prefix():
    # like DeepSeek-R1: the generation prompt adds text the rendered conversation does not have
    tpl = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: <think>{% endif %}"
    )
    tok = byte_tokenizer(template=tpl)
    rows = [row("hi", "yes", "no")]
    out, st = run_table(rows, tok)
    assert st["template_prefix_mismatch"] == 1
    t = out.to_pylist()[0]
    assert tok.decode(t["prompt_input_ids"]) == "user: hi\nassistant: "
    assert tok.decode(t["chosen_input_ids"]) == "yes\n"


# --------------------------------------------------------------------------- truncation
def lens(t):
    return len(t["prompt_input_ids"]), len(t["chosen_input_ids"]), len(t["rejected_input_ids"])


def untruncated(rows, tok):
    out, _ = run_table(rows, tok)
    return out.to_pylist()


def test_truncation_left_cuts_prompt_then_completions():
    tok = build_tiny_tokenizer("char")  # one token per byte: lengths are easy to reason about
    rows = [
        row("P" * 60, "c" * 10, "r" * 12, "mem:0"),  # prompt too long, completions fit after the cut
        row("short", "c" * 80, "r" * 20, "mem:1"),  # prompt fits, chosen too long
        row("Q" * 60, "C" * 80, "R" * 90, "mem:2"),  # both
        row("x" * 7, "y" * 20, "z" * 19, "mem:3"),  # (19 + 7) + (20 + 2) == 48 == max_length: untouched
    ]
    full = untruncated(rows, tok)
    L, M = 48, 24
    assert lens(full[3])[0] + lens(full[3])[1] == L
    out, st = run_table(rows, tok, max_length=L, max_prompt_length=M)
    got = out.to_pylist()
    # row 0: prompt = last M tokens, completions intact
    assert got[0]["prompt_input_ids"] == full[0]["prompt_input_ids"][-M:]
    assert got[0]["chosen_input_ids"] == full[0]["chosen_input_ids"]
    assert got[0]["rejected_input_ids"] == full[0]["rejected_input_ids"]
    assert tok.decode(got[0]["prompt_input_ids"]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    # row 1: prompt kept (<= M), completions cut to L - len(prompt)
    p1 = full[1]["prompt_input_ids"]
    assert len(p1) <= M and got[1]["prompt_input_ids"] == p1
    assert got[1]["chosen_input_ids"] == full[1]["chosen_input_ids"][: L - len(p1)]
    assert got[1]["rejected_input_ids"] == full[1]["rejected_input_ids"]  # 20 + 2 tokens fit the budget
    # row 2: both cut
    assert got[2]["prompt_input_ids"] == full[2]["prompt_input_ids"][-M:]
    assert got[2]["chosen_input_ids"] == full[2]["chosen_input_ids"][: L - M]
    assert got[2]["rejected_input_ids"] == full[2]["rejected_input_ids"][: L - M]
    # row 3: exactly L, nothing cut
    assert got[3] == {k: full[3][k] for k in got[3]}
    for t in got:
        p, c, r = lens(t)
        assert p + max(c, r) <= L
    assert st["prompt_truncated"] == 2 and st["completion_truncated"] == 2
    assert st["lengths"]["total"]["max"] == L
    assert st["lengths_before_truncation"]["total"]["max"] == max(p + max(c, r) for p, c, r in map(lens, full))


def test_truncate_pair_unit_rules():
    p, c, r = list(range(10)), list(range(100, 130)), list(range(200, 205))
    assert truncate_pair(p, c, r, 40, 20) == (p, c, r, False, False)  # 10 + 30 == 40 fits
    p2, c2, r2, pc, cc = truncate_pair(p, c, r, 30, 4)
    assert (p2, c2, r2, pc, cc) == (p[-4:], c[:26], r, True, True)
    # a kept BOS stays in front of the left-cut prompt
    p3, *_ = truncate_pair([0] + p, c, r, 30, 4, keep_first=1)
    assert p3 == [0] + p[-3:]
    p4, *_ = truncate_pair([0] + p, c, r, 30, 1, keep_first=1)
    assert p4 == [0]


def test_rows_without_completion_tokens_are_dropped_and_counted():
    # a template that renders the assistant content only: an empty answer gives no completion token
    tpl = "{% for m in messages %}{% if m['role'] == 'user' %}U:{{ m['content'] }}\n{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    tok = byte_tokenizer(template=tpl)
    rows = [
        row("a", "", "no", "mem:0"),  # empty chosen
        row("b", "yes", "no", "mem:1"),
        row("c", "same start X", "same start Y", "mem:2"),  # identical once cut to the budget
    ]
    out, st = run_table(rows, tok, max_length=8, max_prompt_length=4)
    assert st["rows_in"] == 3 and st["rows_out"] == 1
    assert st["dropped"] == {"empty_completion": 1, "identical_completions": 1}
    assert st["dropped_examples"] == {"empty_completion": ["mem:0"], "identical_completions": ["mem:2"]}
    assert st["rows_in"] == st["rows_out"] + sum(st["dropped"].values())
    # without truncation the same pair is kept: the drop came from the cut
    _, st_full = run_table(rows[2:], tok, max_length=64, max_prompt_length=32)
    assert st_full["rows_out"] == 1 and st_full["dropped"] == {}
    assert tok.decode(out.to_pylist()[0]["chosen_input_ids"]) == "yes"
    assert all(len(t["chosen_input_ids"]) > 0 and len(t["rejected_input_ids"]) > 0 for t in out.to_pylist())


def test_bos_prepended_for_bos_adding_tokenizer_and_kept_by_truncation():
    tok = byte_tokenizer(bos_post=True)
    setup_chat_format(tok)
    bos = tok.bos_token_id
    rows = [row("p" * 40, "c", "r")]
    full = untruncated(rows, tok)[0]
    assert full["prompt_input_ids"][0] == bos and full["prompt_input_ids"].count(bos) == 1
    assert tok.decode(full["prompt_input_ids"][1:]) == tok.apply_chat_template(rows[0]["prompt"], tokenize=False, add_generation_prompt=True)
    out, _ = run_table(rows, tok, max_length=20, max_prompt_length=10)
    p = out.to_pylist()[0]["prompt_input_ids"]
    assert p == [bos] + full["prompt_input_ids"][-9:]


# --------------------------------------------------------------------------- bad rows
def test_bad_rows_raise_with_file_row_field_or_are_skipped():
    tok = build_tiny_tokenizer("char")
    rows = chatml_rows()
    rows[1]["prompt"] = rows[1]["prompt"][:-1]  # now ends with an assistant turn
    with pytest.raises(DataError) as e:
        run_table(rows, tok)
    assert "mem.parquet" in str(e.value) and "row 1" in str(e.value) and "prompt[2].role" in str(e.value)
    out, st = run_table(rows, tok, on_error="skip")
    assert st["rows_out"] == 2 and st["dropped"] == {"bad_conversation": 1}


def test_template_error_names_the_row():
    tpl = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tok = byte_tokenizer(template=tpl)
    rows = [row("fine", "a", "b"), row([msg("system", "s"), msg("user", "u")], "a", "b"), row("fine too", "a", "b")]
    with pytest.raises(DataError, match=r"row 1.*System role not supported"):
        run_table(rows, tok)
    out, st = run_table(rows, tok, on_error="skip")
    assert st["rows_out"] == 2 and st["dropped"] == {"bad_conversation": 1}


def test_control_token_text_is_counted():
    tok = build_tiny_tokenizer("char")
    _, st = run_table([row("say <|im_end|> please", "ok", "no"), row("plain", "ok", "no")], tok)
    assert st["control_token_text"] == 1


# --------------------------------------------------------------------------- fingerprint
def test_fingerprint_stable_across_save_load_and_sensitive(tmp_path):
    from transformers import AutoTokenizer

    tok = build_tiny_tokenizer("char")
    fp = tokenizer_fingerprint(tok)
    assert len(fp) == 64 and fp == tokenizer_fingerprint(build_tiny_tokenizer("char"))
    tok.save_pretrained(tmp_path / "t")
    again = AutoTokenizer.from_pretrained(tmp_path / "t")
    assert tokenizer_fingerprint(again) == fp
    again.add_tokens(["<extra>"])
    assert tokenizer_fingerprint(again) != fp
    other = AutoTokenizer.from_pretrained(tmp_path / "t")
    other.chat_template = CHATML_TEMPLATE + " "
    assert tokenizer_fingerprint(other) != fp
    plain = byte_tokenizer()
    fp_plain = tokenizer_fingerprint(plain)
    setup_chat_format(plain)
    assert tokenizer_fingerprint(plain) != fp_plain


def test_fingerprint_stable_for_gpt2(shared_data, tmp_path):
    from transformers import AutoTokenizer

    tok = gpt2_plain(shared_data)
    setup_chat_format(tok)
    tok.save_pretrained(tmp_path / "g")
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path / "g")) == tokenizer_fingerprint(tok)
    assert tokenizer_fingerprint(tok) != tokenizer_fingerprint(build_tiny_tokenizer("gpt2"))  # other pad/bos


# --------------------------------------------------------------------------- stage
def make_recipe(tmp_path, model: dict, **data):
    return recipe_from_dict(
        {
            "run_name": "t",
            "output_dir": str(tmp_path / "run"),
            "model": model,
            "data": {"sources": [{"synthetic": {"n_rows": 10}}], "max_length": 64, "max_prompt_length": 32, **data},
        }
    )


def write_data(data_dir: Path, train_rows, test_rows, stats=None):
    data_dir.mkdir(parents=True, exist_ok=True)
    write_pairs(train_rows, data_dir / "train.parquet")
    write_pairs(test_rows, data_dir / "test.parquet")
    (data_dir / "stats.json").write_text(json.dumps(stats or {"rows_kept": len(train_rows) + len(test_rows)}))


def test_tokenize_dataset_end_to_end(tmp_path):
    from transformers import AutoTokenizer

    from orpo_core.data.synthetic.arithmetic import generate_arithmetic

    recipe = make_recipe(tmp_path, {"name_or_path": "tiny"}, max_length=128, max_prompt_length=64)
    rows = generate_arithmetic(60, seed=3)  # all fit in 128 tokens
    long_row = row("L" * 200, "a" * 100, "b" * 100, "mem:long")
    write_data(tmp_path / "data", rows[:50] + [long_row], rows[50:], {"rows_kept": 61, "marker": "prep"})
    out = tmp_path / "run" / "tokenized"
    stats = tokenize_dataset(recipe, tmp_path / "data", out)

    assert sorted(p.name for p in out.iterdir()) == ["stats.json", "test.parquet", "tokenizer", "train.parquet"]
    assert json.loads((out / "stats.json").read_text()) == json.loads(json.dumps(stats))
    assert stats["marker"] == "prep"  # prepare stats carried over
    tz = stats["tokenization"]
    assert tz["train"]["rows_in"] == 51 and tz["train"]["rows_out"] == 51 and tz["test"]["rows_out"] == 10
    assert tz["train"]["prompt_truncated"] == 1 and tz["train"]["completion_truncated"] == 1
    for part in ("prompt", "chosen", "rejected", "total"):
        q = tz["train"]["lengths"][part]
        assert q["p50"] <= q["p90"] <= q["p95"] <= q["p99"] <= q["max"]
    assert tz["train"]["lengths"]["total"]["max"] == 128

    train = pq.read_table(out / "train.parquet")
    assert train.schema.equals(TOKENIZED_SCHEMA)
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    info = stats["tokenizer"]
    assert info["fingerprint"] == tokenizer_fingerprint(tok) == check_tokenizer_matches(out, tok)
    assert info["vocab_size"] == len(tok) == 259 and info["added_tokens"] is False
    first = train.slice(0, 1).to_pylist()[0]
    assert tok.decode(first["prompt_input_ids"] + first["chosen_input_ids"]) == tok.apply_chat_template(
        rows[0]["prompt"] + rows[0]["chosen"], tokenize=False
    )
    ds = load_tokenized(out, "train")
    assert len(ds) == 51 and ds.column_names == list(TOKENIZED_SCHEMA.names)
    assert ds[0]["chosen_input_ids"] == first["chosen_input_ids"]

    # a different tokenizer is refused by the trainer-side check
    other = build_tiny_tokenizer("char")
    other.add_tokens(["<new>"])
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        check_tokenizer_matches(out, other)

    # re-running replaces the folder atomically and leaves no temp folders behind
    write_data(tmp_path / "data", rows[:20], rows[50:])
    stats2 = tokenize_dataset(recipe, tmp_path / "data", out)
    assert stats2["tokenization"]["train"]["rows_out"] == 20 and len(load_tokenized(out, "train")) == 20
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


def test_tokenize_dataset_failure_leaves_previous_output(tmp_path):
    recipe = make_recipe(tmp_path, {"name_or_path": "tiny"})
    out = tmp_path / "run" / "tokenized"
    write_data(tmp_path / "data", chatml_rows(), chatml_rows()[:1])
    tokenize_dataset(recipe, tmp_path / "data", out)
    before = (out / "train.parquet").read_bytes()
    bad = chatml_rows()
    bad[2]["prompt"] = [msg("user", "x"), msg("assistant", "y")]
    write_data(tmp_path / "data", bad, chatml_rows()[:1])
    with pytest.raises(DataError, match=r"train\.parquet.*row 2"):
        tokenize_dataset(recipe, tmp_path / "data", out)
    assert (out / "train.parquet").read_bytes() == before
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


def test_tokenize_dataset_adds_chatml_to_template_less_gpt2(shared_data, tmp_path):
    from transformers import AutoTokenizer

    base = tmp_path / "gpt2-base"
    gpt2_plain(shared_data).save_pretrained(base)
    recipe = make_recipe(tmp_path, {"name_or_path": str(base)}, max_length=256, max_prompt_length=128)
    write_data(tmp_path / "data", chatml_rows(), chatml_rows()[:1])
    stats = tokenize_dataset(recipe, tmp_path / "data", tmp_path / "tok")
    info = stats["tokenizer"]
    assert info["added_tokens"] is True and info["vocab_size"] == 50259 and info["eos_token"] == "<|im_end|>"
    saved = AutoTokenizer.from_pretrained(tmp_path / "tok" / "tokenizer")
    assert saved.chat_template == CHATML_TEMPLATE and len(saved) == 50259
    check_tokenizer_matches(tmp_path / "tok", saved)
    t = load_tokenized(tmp_path / "tok", "train")[1]
    assert saved.decode(t["prompt_input_ids"] + t["rejected_input_ids"]) == saved.apply_chat_template(
        chatml_rows()[1]["prompt"] + chatml_rows()[1]["rejected"], tokenize=False
    )


def test_load_tokenized_errors_name_file_and_column(tmp_path):
    with pytest.raises(DataError, match="train.parquet.*does not exist"):
        load_tokenized(tmp_path, "train")
    pq.write_table(pa.table({"prompt_input_ids": [[1]], "chosen_input_ids": [[2]], "source": ["s"]}), tmp_path / "train.parquet")
    with pytest.raises(DataError, match="train.parquet.*rejected_input_ids.*missing column"):
        load_tokenized(tmp_path, "train")
    pq.write_table(
        pa.table({"prompt_input_ids": [[1], [1]], "chosen_input_ids": [[2], []], "rejected_input_ids": [[3], [3]], "source": ["s", "s"]}),
        tmp_path / "test.parquet",
    )
    with pytest.raises(DataError, match=r"test.parquet: row 1: field 'chosen_input_ids': empty"):
        load_tokenized(tmp_path, "test")
    pq.write_table(
        pa.table({"prompt_input_ids": [["a"]], "chosen_input_ids": [[2]], "rejected_input_ids": [[3]], "source": ["s"]}),
        tmp_path / "test.parquet",
    )
    with pytest.raises(DataError, match="prompt_input_ids.*list of integers"):
        load_tokenized(tmp_path, "test")
    with pytest.raises(ValueError, match="stats.json does not exist"):
        check_tokenizer_matches(tmp_path, build_tiny_tokenizer("char"))

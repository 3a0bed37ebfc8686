"""The tokenization stage: normalized pairs -> chat template -> token ids (Parquet).

:func:`tokenize_dataset` reads ``data/{train,test}.parquet`` (the normalized pair
schema, :mod:`orpo_core.data.schema`) and writes, atomically (temp folder + rename)::

    <out_dir>/train.parquet   prompt_input_ids, chosen_input_ids, rejected_input_ids (list<int32>), source (string)
    <out_dir>/test.parquet
    <out_dir>/tokenizer/      the exact tokenizer used (with its chat template)
    <out_dir>/stats.json      data/stats.json + "tokenization" + "tokenizer" sections

How a pair is tokenized (batched, ``datasets.Dataset.map(batched=True)``):

1. Render with the chat template (text, no tokenization): ``G`` =
   template(prompt, add_generation_prompt=True), ``C`` = template(prompt + chosen),
   ``R`` = template(prompt + rejected). The prompt text is the common prefix of
   ``G``, ``C`` and ``R`` (normally ``G`` itself; TRL's ``apply_chat_template`` in
   trl/data_utils.py does the same for templates such as DeepSeek-R1's whose
   generation prompt is not a prefix of the rendered conversation; such rows are
   counted as ``template_prefix_mismatch``).
2. Tokenize the prompt text and the two full texts in one batched call of the fast
   tokenizer with ``add_special_tokens=False`` (special tokens come from the template).
3. Completion ids = full ids with the prompt ids removed, after checking that the
   full ids really start with the prompt ids. When they do not (a BPE merge across
   the prompt/completion boundary; impossible for templates that end the generation
   prompt with a special token, such as ChatML), the rendered completion text
   (``C`` minus the prompt text) is tokenized on its own instead, so prompt ids +
   completion ids still decode to the rendered conversation; such rows are counted as
   ``prefix_fallback``. The completion therefore contains exactly what the template
   adds for the assistant turn, its end-of-turn token included (for ChatML:
   ``content<|im_end|>\\n``). No EOS is appended (TRL's ``add_eos_token_if_needed``
   would append EOS when the template's end-of-turn token is a different token).
4. BOS: when the tokenizer itself prepends BOS on ordinary encodings
   (``add_special_tokens=True``, e.g. Llama) and the rendered prompt does not
   start with it, BOS is prepended to the prompt ids (as TRL's
   ``add_bos_token_if_needed``); templates that already emit ``{{ bos_token }}``
   are left alone. GPT-2 style and ChatML-only tokenizers get no BOS.
5. Truncation, as TRL's ORPO ``tokenize_row`` (``truncation_mode="keep_end"``,
   TRL <= 0.11): if ``len(prompt) + max(len(chosen), len(rejected)) >
   data.max_length``, the prompt is first cut from the LEFT to
   ``data.max_prompt_length`` tokens (a BOS prepended in step 4 is kept in front),
   then both completions are cut to ``max_length - len(prompt)`` tokens.
6. Dropped rows (counted per reason, never trained on): ``empty_completion`` (a
   completion with no token), ``identical_completions`` (chosen and rejected ids
   equal, in the input or once truncated: the odds-ratio term is constant, no
   preference signal), ``bad_conversation`` (a row the template
   cannot render, or a prompt that does not end with a user turn; only with
   ``data.on_error: skip``, otherwise :class:`~orpo_core.data.errors.DataError`).

Control tokens typed inside message contents (e.g. a literal ``<|im_end|>`` in a
user message) are tokenized as control tokens, as in TRL; rows containing any are
counted as ``control_token_text`` and a warning is logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from orpo_core.io import make_owned_temp_dir, replace_dir
from orpo_core.data.context_length import check_max_length
from orpo_core.data.errors import BAD_CONVERSATION, BAD_VALUE, MISSING_COLUMN, UNREADABLE, DataError, RowRef

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
ID_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
TOKENIZED_SCHEMA = pa.schema(
    [
        ("prompt_input_ids", pa.list_(pa.int32())),
        ("chosen_input_ids", pa.list_(pa.int32())),
        ("rejected_input_ids", pa.list_(pa.int32())),
        ("source", pa.string()),
    ]
)
INPUT_COLUMNS = ("prompt", "chosen", "rejected", "source")

EMPTY_COMPLETION = "empty_completion"
IDENTICAL_COMPLETIONS = "identical_completions"
PERCENTILES = (50, 90, 95, 99)
ROWS_PER_PROC = 1000  # below this many rows per process, extra processes cost more than they save
MAX_DROP_EXAMPLES = 3
_FLAG_COLUMNS = (
    "_fallback",
    "_template_mismatch",
    "_prompt_truncated",
    "_completion_truncated",
    "_control_text",
    "_raw_prompt",
    "_raw_chosen",
    "_raw_rejected",
)
FINGERPRINT_VERSION = 1


# --------------------------------------------------------------------------- fingerprint
def tokenizer_fingerprint(tok: Any) -> str:
    """sha256 (hex) identifying what a tokenizer produces.

    Hashes a canonical JSON of: the full vocabulary (``get_vocab()``, added tokens
    included), the added tokens with their flags (special, lstrip, rstrip,
    normalized, single_word), the special-token map (bos/eos/pad/unk/... and extra
    special tokens), the chat template, and for fast tokenizers the Rust pipeline
    (normalizer, pre-tokenizer, model with merges, post-processor, decoder; the
    runtime ``padding``/``truncation`` settings are excluded). The tokenizer class and
    ``name_or_path`` are not included, so the value is stable across
    ``save_pretrained`` / ``from_pretrained`` and differs as soon as a token is
    added or the template changes.

    Returns:
        64 hex characters.
    """
    added = sorted(
        (int(i), t.content, bool(t.special), bool(t.lstrip), bool(t.rstrip), bool(t.normalized), bool(t.single_word))
        for i, t in tok.added_tokens_decoder.items()
    )
    special: dict[str, Any] = {}
    for k, v in tok.special_tokens_map.items():
        special[k] = sorted(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    extra = getattr(tok, "extra_special_tokens", None) or []
    special["_extra"] = sorted(map(str, extra if isinstance(extra, (list, tuple)) else extra.values()))
    template = tok.chat_template
    payload: dict[str, Any] = {
        "version": FINGERPRINT_VERSION,
        "vocab": sorted(tok.get_vocab().items(), key=lambda kv: (kv[1], kv[0])),
        "added": added,
        "special": special,
        "chat_template": template if not isinstance(template, dict) else sorted(template.items()),
    }
    backend = getattr(tok, "backend_tokenizer", None) if getattr(tok, "is_fast", False) else None
    if backend is not None:
        spec = json.loads(backend.to_str())
        payload["backend"] = {k: v for k, v in spec.items() if k not in ("padding", "truncation", "added_tokens")}
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def tokenizer_info(tok: Any, added_tokens: bool) -> dict[str, Any]:
    """The ``tokenizer`` section of ``tokenized/stats.json``.

    Keys: ``fingerprint`` (:func:`tokenizer_fingerprint`), ``name_or_path``,
    ``vocab_size`` (``len(tok)``, the embedding rows the model needs), ``added_tokens``
    (bool: ChatML tokens were added, resize the model's embeddings), ``eos_token``,
    ``pad_token``, ``bos_token``, ``chat_template_sha256``.
    """
    tpl = tok.chat_template
    tpl_s = tpl if isinstance(tpl, str) else json.dumps(tpl, sort_keys=True) if tpl else ""
    return {
        "fingerprint": tokenizer_fingerprint(tok),
        "name_or_path": str(tok.name_or_path),
        "vocab_size": len(tok),
        "added_tokens": bool(added_tokens),
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "pad_token": tok.pad_token,
        "chat_template_sha256": hashlib.sha256(tpl_s.encode("utf-8")).hexdigest(),
    }


def check_tokenizer_matches(tokenized_dir: str | Path, tokenizer: Any) -> str:
    """Check that ``tokenizer`` is the one that produced ``tokenized_dir`` (called by the trainer).

    Compares :func:`tokenizer_fingerprint` with ``tokenized_dir/stats.json``
    ``tokenizer.fingerprint``.

    Returns:
        the fingerprint.

    Raises:
        ValueError: missing or unreadable ``stats.json`` or fingerprint, or a different
            fingerprint (message names both tokenizers, both fingerprints and the file).
    """
    path = Path(tokenized_dir) / "stats.json"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: {tokenized_dir} is not a complete tokenize stage output")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))["tokenizer"]
        expected = info["fingerprint"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: no readable 'tokenizer.fingerprint' ({type(e).__name__}: {e})") from None
    actual = tokenizer_fingerprint(tokenizer)
    if actual != expected:
        raise ValueError(
            f"tokenizer mismatch: {tokenized_dir} was tokenized with {info.get('name_or_path')!r} "
            f"(fingerprint {expected[:16]}..., {info.get('vocab_size')} tokens) but the tokenizer given is "
            f"{getattr(tokenizer, 'name_or_path', '?')!r} (fingerprint {actual[:16]}..., {len(tokenizer)} tokens); "
            f"load {Path(tokenized_dir) / 'tokenizer'} or re-run the tokenize stage"
        )
    return actual


# --------------------------------------------------------------------------- reading
def load_tokenized(tokenized_dir: str | Path, split: str):
    """Read ``tokenized_dir/<split>.parquet`` as an in-memory ``datasets.Dataset``.

    Columns: ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids``
    (lists of int32 token ids) and ``source`` (string).

    Raises:
        DataError: missing or unreadable file (``unreadable``), a missing column
            (``missing_column``), a column that is not a list of integers, or a row whose
            prompt or completion is empty or null (``bad_value``; names the row). The
            message names the file and the column.
    """
    import datasets
    from datasets.table import InMemoryTable

    path = Path(tokenized_dir) / f"{split}.parquet"
    if not path.is_file():
        raise DataError("tokenized file does not exist", file=str(path), reason=UNREADABLE, fatal=True)
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise DataError(f"unreadable Parquet ({e})", file=str(path), reason=UNREADABLE, fatal=True) from None
    for name in TOKENIZED_SCHEMA.names:
        if name not in table.column_names:
            raise DataError(
                f"missing column (have {table.column_names})", file=str(path), field=name, reason=MISSING_COLUMN, fatal=True
            )
    for name in ID_COLUMNS:
        typ = table.schema.field(name).type
        if not (pa.types.is_list(typ) or pa.types.is_large_list(typ)) or not pa.types.is_integer(typ.value_type):
            raise DataError(f"expected a list of integers, got {typ}", file=str(path), field=name, reason=BAD_VALUE, fatal=True)
        col = table.column(name)
        bad = pc.or_(pc.is_null(col), pc.equal(pc.fill_null(pc.list_value_length(col), 0), 0))
        if table.num_rows and pc.any(bad).as_py():
            row = int(pc.index(bad, True).as_py())
            raise DataError("empty or null token list", ref=RowRef(str(path), row), field=name, reason=BAD_VALUE, fatal=True)
    table = table.select(list(TOKENIZED_SCHEMA.names)).cast(TOKENIZED_SCHEMA)
    return datasets.Dataset(InMemoryTable(table), split=split)


def _read_pairs_table(path: Path) -> pa.Table:
    if not path.is_file():
        raise DataError("normalized pair file does not exist (run the prepare stage)", file=str(path), reason=UNREADABLE, fatal=True)
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"unreadable Parquet ({e})", file=str(path), reason=UNREADABLE, fatal=True) from None
    for name in INPUT_COLUMNS:
        if name not in table.column_names:
            raise DataError(
                f"missing column (have {table.column_names})", file=str(path), field=name, reason=MISSING_COLUMN, fatal=True
            )
    keep = list(INPUT_COLUMNS) + (["origin"] if "origin" in table.column_names else [])
    return table.select(keep)


# --------------------------------------------------------------------------- core (batched)
def bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos_token_id]`` when the tokenizer prepends BOS to ordinary encodings
    (``add_special_tokens=True``), else ``[]``."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    if len(with_special) > len(plain) and with_special[0] == bos and (not plain or plain[0] != bos):
        return [bos]
    return []


def truncate_pair(
    prompt: list[int],
    chosen: list[int],
    rejected: list[int],
    max_length: int,
    max_prompt_length: int,
    keep_first: int = 0,
) -> tuple[list[int], list[int], list[int], bool, bool]:
    """Apply ORPO's truncation rules to one pair (TRL ``ORPOTrainer.tokenize_row``, keep_end mode).

    If ``len(prompt) + max(len(chosen), len(rejected)) > max_length``: the prompt is
    cut from the left to ``max_prompt_length`` tokens (its first ``keep_first`` tokens,
    a BOS, stay in front), then each completion is cut to ``max_length - len(prompt)``.

    Returns:
        ``(prompt, chosen, rejected, prompt_truncated, completion_truncated)``.
    """
    longer = max(len(chosen), len(rejected))
    p_cut = c_cut = False
    if len(prompt) + longer > max_length:
        if len(prompt) > max_prompt_length:
            head = prompt[: min(keep_first, max_prompt_length)]
            tail_n = max_prompt_length - len(head)
            prompt = head + (prompt[len(prompt) - tail_n :] if tail_n > 0 else [])
            p_cut = True
        budget = max(max_length - len(prompt), 0)
        if len(chosen) > budget or len(rejected) > budget:
            chosen, rejected = chosen[:budget], rejected[:budget]
            c_cut = True
    return prompt, chosen, rejected, p_cut, c_cut


def _common_prefix(a: str, b: str, c: str) -> str:
    if b.startswith(a) and c.startswith(a):
        return a
    return os.path.commonprefix([a, b, c])


def _render(tokenizer: Any, convs: list[list[dict]], gen: bool, refs: list[RowRef], field: str) -> list[str]:
    """Render conversations to text; on a template error, find the row and raise DataError."""
    try:
        return tokenizer.apply_chat_template(convs, tokenize=False, add_generation_prompt=gen)
    except Exception:  # noqa: BLE001 - jinja raises TemplateError and friends; locate the row
        for conv, ref in zip(convs, refs):
            try:
                tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            except Exception as e:  # noqa: BLE001
                raise DataError(f"chat template failed: {type(e).__name__}: {e}", ref=ref, field=field, reason=BAD_CONVERSATION) from None
        raise


def _check_row(prompt: Any, chosen: Any, rejected: Any) -> tuple[str, str] | None:
    """(field, problem) for a row that cannot be tokenized, else None."""
    if not prompt:
        return "prompt", "empty prompt"
    if prompt[-1].get("role") != "user":
        return f"prompt[{len(prompt) - 1}].role", f"the prompt must end with a user turn, got {prompt[-1].get('role')!r}"
    for name, comp in (("chosen", chosen), ("rejected", rejected)):
        if not comp:
            return name, "no completion message"
        if comp[0].get("role") != "assistant":
            return f"{name}[0].role", f"a completion must start with an assistant turn, got {comp[0].get('role')!r}"
    return None


def _tokenize_batch(
    batch: dict[str, list],
    indices: list[int],
    *,
    tokenizer: Any,
    max_length: int,
    max_prompt_length: int,
    bos: list[int],
    file: str,
    on_error: str,
    control_re: str | None,
) -> dict[str, list]:
    """``datasets.map`` function (batched): normalized rows -> token ids plus bookkeeping columns."""
    n = len(batch["prompt"])
    refs = [RowRef(file, i) for i in indices]
    drop = [""] * n
    ok: list[int] = []
    for i in range(n):
        problem = _check_row(batch["prompt"][i], batch["chosen"][i], batch["rejected"][i])
        if problem is None:
            ok.append(i)
            continue
        if on_error == "raise":
            raise DataError(problem[1], ref=refs[i], field=problem[0], reason=BAD_CONVERSATION)
        drop[i] = BAD_CONVERSATION

    def render(rows: list[int], which: str | None) -> list[str]:
        if not rows:
            return []
        convs = [batch["prompt"][i] + (batch[which][i] if which else []) for i in rows]
        return _render(tokenizer, convs, which is None, [refs[i] for i in rows], which or "prompt")

    rows = ok
    if on_error == "skip":  # render row by row only where the batch render fails
        try:
            gen, full_c, full_r = render(rows, None), render(rows, "chosen"), render(rows, "rejected")
        except DataError:
            good = []
            for i in rows:
                try:
                    render([i], None), render([i], "chosen"), render([i], "rejected")
                    good.append(i)
                except DataError:
                    drop[i] = BAD_CONVERSATION
            rows = good
            gen, full_c, full_r = render(rows, None), render(rows, "chosen"), render(rows, "rejected")
    else:
        gen, full_c, full_r = render(rows, None), render(rows, "chosen"), render(rows, "rejected")

    m = len(rows)
    prompt_text = [_common_prefix(g, c, r) for g, c, r in zip(gen, full_c, full_r)]
    mismatch = [int(p != g) for p, g in zip(prompt_text, gen)]
    enc = tokenizer(
        prompt_text + full_c + full_r,
        add_special_tokens=False,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )["input_ids"]
    p_ids, c_full, r_full = enc[:m], enc[m : 2 * m], enc[2 * m :]

    comps: list[list[list[int] | None]] = [[None, None] for _ in range(m)]
    fallback_texts: list[str] = []
    fallback_at: list[tuple[int, int]] = []
    for j in range(m):
        k = len(p_ids[j])
        for s, (full_ids, full_text) in enumerate(((c_full[j], full_c[j]), (r_full[j], full_r[j]))):
            if full_ids[:k] == p_ids[j]:
                comps[j][s] = full_ids[k:]
            else:
                fallback_texts.append(full_text[len(prompt_text[j]) :])
                fallback_at.append((j, s))
    if fallback_texts:
        fb = tokenizer(fallback_texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        for (j, s), ids in zip(fallback_at, fb):
            comps[j][s] = ids
    fell_back = [0] * m
    for j, _ in fallback_at:
        fell_back[j] = 1

    out: dict[str, list] = {
        "prompt_input_ids": [[] for _ in range(n)],
        "chosen_input_ids": [[] for _ in range(n)],
        "rejected_input_ids": [[] for _ in range(n)],
        "_drop": drop,
        "_fallback": [0] * n,
        "_template_mismatch": [0] * n,
        "_prompt_truncated": [0] * n,
        "_completion_truncated": [0] * n,
        "_control_text": [0] * n,
        "_raw_prompt": [0] * n,
        "_raw_chosen": [0] * n,
        "_raw_rejected": [0] * n,
    }
    for j, i in enumerate(rows):
        p = p_ids[j]
        if bos and (not p or p[0] != bos[0]):
            p = bos + p
        c, r = comps[j]
        out["_raw_prompt"][i], out["_raw_chosen"][i], out["_raw_rejected"][i] = len(p), len(c), len(r)
        p, c, r, p_cut, c_cut = truncate_pair(p, c, r, max_length, max_prompt_length, keep_first=len(bos))
        out["prompt_input_ids"][i], out["chosen_input_ids"][i], out["rejected_input_ids"][i] = p, c, r
        out["_fallback"][i] = fell_back[j]
        out["_template_mismatch"][i] = mismatch[j]
        out["_prompt_truncated"][i], out["_completion_truncated"][i] = int(p_cut), int(c_cut)
        if not c or not r:
            out["_drop"][i] = EMPTY_COMPLETION
        elif c == r:
            out["_drop"][i] = IDENTICAL_COMPLETIONS
    if control_re:
        pat = re.compile(control_re)
        for i in rows:
            msgs = batch["prompt"][i] + batch["chosen"][i] + batch["rejected"][i]
            out["_control_text"][i] = int(any(pat.search(m_.get("content") or "") for m_ in msgs))
    return out


def _control_pattern(tokenizer: Any) -> str | None:
    tokens = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content}
    if not tokens:
        return None
    return "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))


def _percentiles(values: np.ndarray) -> dict[str, int] | None:
    if values.size == 0:
        return None
    out = {f"p{q}": int(np.percentile(values, q, method="nearest")) for q in PERCENTILES}
    out["max"] = int(values.max())
    out["mean"] = round(float(values.mean()), 2)
    return out


def _lengths(p: np.ndarray, c: np.ndarray, r: np.ndarray) -> dict[str, Any]:
    return {
        "prompt": _percentiles(p),
        "chosen": _percentiles(c),
        "rejected": _percentiles(r),
        "total": _percentiles(p + np.maximum(c, r)),
    }


def tokenize_table(
    table: pa.Table,
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int,
    file: str = "<table>",
    num_proc: int = 1,
    on_error: str = "raise",
    batch_size: int = 1000,
) -> tuple[pa.Table, dict[str, Any]]:
    """Tokenize a normalized pair table (see the module docstring for the rules).

    Args:
        table: pyarrow table with ``prompt``, ``chosen``, ``rejected`` (message lists),
            ``source`` and optionally ``origin``.
        tokenizer: a tokenizer with a chat template (fast recommended).
        max_length: max prompt + completion tokens (``data.max_length``).
        max_prompt_length: prompt tokens kept when truncating (``data.max_prompt_length``).
        file: name used in error messages and stats (the Parquet path).
        num_proc: processes for ``datasets.map`` (used only with >= 1000 rows per process).
        on_error: ``raise`` (DataError on a bad row) or ``skip`` (drop as ``bad_conversation``).
        batch_size: rows per ``datasets.map`` batch (one template render and one tokenizer
            call per batch).

    Returns:
        ``(tokenized table with TOKENIZED_SCHEMA, split stats)``. Split stats: ``rows_in``,
        ``rows_out``, ``dropped`` {reason: n}, ``dropped_examples`` {reason: [origin]},
        ``prompt_truncated``, ``completion_truncated``, ``prefix_fallback``,
        ``template_prefix_mismatch``, ``control_token_text``, ``tokens`` (prompt + chosen +
        rejected ids written), ``lengths`` and ``lengths_before_truncation`` (token-count
        percentiles p50/p90/p95/p99/max/mean of prompt, chosen, rejected and total =
        prompt + longer completion; None for an empty split).

    Raises:
        DataError: a row the template cannot render or whose prompt does not end with a
            user turn (names file, row and field), with ``on_error="raise"``.
    """
    import datasets
    from datasets.table import InMemoryTable

    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length})")
    if not _has_template(tokenizer):
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template (use orpo_core.models.chat.load_tokenizer)")
    n = table.num_rows
    stats: dict[str, Any] = {"rows_in": n}
    if n == 0:
        empty = TOKENIZED_SCHEMA.empty_table()
        stats.update(rows_out=0, dropped={}, dropped_examples={}, prompt_truncated=0, completion_truncated=0,
                     prefix_fallback=0, template_prefix_mismatch=0, control_token_text=0, tokens=0,
                     lengths=_lengths(*(np.zeros(0, dtype=np.int64),) * 3),
                     lengths_before_truncation=_lengths(*(np.zeros(0, dtype=np.int64),) * 3))
        return empty, stats
    procs = max(1, min(int(num_proc), math.ceil(n / ROWS_PER_PROC)))
    ds = datasets.Dataset(InMemoryTable(table))
    fn_kwargs = {
        "tokenizer": tokenizer,
        "max_length": int(max_length),
        "max_prompt_length": int(max_prompt_length),
        "bos": bos_prefix(tokenizer),
        "file": file,
        "on_error": on_error,
        "control_re": _control_pattern(tokenizer),
    }
    ids = datasets.List(datasets.Value("int32"))
    flag = datasets.Value("int32")
    features = datasets.Features(
        {
            **{c: ids for c in ID_COLUMNS},
            **{c: datasets.Value("string") for c in ("source", "origin", "_drop") if c in ds.column_names or c == "_drop"},
            **{c: flag for c in _FLAG_COLUMNS},
        }
    )
    mapped = ds.map(
        _tokenize_batch,
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        fn_kwargs=fn_kwargs,
        num_proc=procs if procs > 1 else None,
        remove_columns=[c for c in ds.column_names if c not in ("source", "origin")],
        keep_in_memory=True,
        features=features,  # explicit types: no per-batch type inference when writing
        on_mixed_types=None,
        new_fingerprint=uuid.uuid4().hex,  # in-memory, never cached: skip hashing the tokenizer
        desc=f"tokenizing {Path(file).name}" if procs > 1 else None,
    )
    t = mapped.data.table if hasattr(mapped.data, "table") else mapped.data
    if mapped._indices is not None:  # pragma: no cover - map never returns an indices mapping here
        t = mapped.flatten_indices().data.table
    drop = np.asarray(t.column("_drop").to_pylist(), dtype=object)
    kept = drop == ""
    col = lambda name: t.column(name).to_numpy(zero_copy_only=False).astype(np.int64)  # noqa: E731
    origins = t.column("origin").to_pylist() if "origin" in t.column_names else [f"{file}:{i}" for i in range(n)]
    dropped: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    for i in np.nonzero(~kept)[0]:
        reason = drop[i]
        dropped[reason] = dropped.get(reason, 0) + 1
        if len(examples.setdefault(reason, [])) < MAX_DROP_EXAMPLES:
            examples[reason].append(origins[i])
    out = t.filter(pa.array(kept)).select(list(TOKENIZED_SCHEMA.names)).cast(TOKENIZED_SCHEMA)
    p_len = pc.list_value_length(out.column("prompt_input_ids")).to_numpy().astype(np.int64)
    c_len = pc.list_value_length(out.column("chosen_input_ids")).to_numpy().astype(np.int64)
    r_len = pc.list_value_length(out.column("rejected_input_ids")).to_numpy().astype(np.int64)
    stats.update(
        rows_out=out.num_rows,
        dropped=dict(sorted(dropped.items())),
        dropped_examples=dict(sorted(examples.items())),
        prompt_truncated=int(col("_prompt_truncated")[kept].sum()),
        completion_truncated=int(col("_completion_truncated")[kept].sum()),
        prefix_fallback=int(col("_fallback").sum()),
        template_prefix_mismatch=int(col("_template_mismatch").sum()),
        control_token_text=int(col("_control_text").sum()),
        tokens=int(p_len.sum() + c_len.sum() + r_len.sum()),
        lengths=_lengths(p_len, c_len, r_len),
        lengths_before_truncation=_lengths(col("_raw_prompt")[kept], col("_raw_chosen")[kept], col("_raw_rejected")[kept]),
    )
    if stats["control_token_text"]:
        log.warning(
            "%s: %d rows contain control-token text (e.g. a literal end-of-turn token) in a message; "
            "it is tokenized as the control token",
            file,
            stats["control_token_text"],
        )
    if stats["prefix_fallback"]:
        log.info("%s: %d rows tokenized with the completion-text fallback (prompt ids were not a prefix)", file, stats["prefix_fallback"])
    return out, stats


def _has_template(tok: Any) -> bool:
    from orpo_core.models.chat import has_chat_template

    return has_chat_template(tok)


# --------------------------------------------------------------------------- stage entry
def tokenize_dataset(recipe: Any, data_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Run the tokenization stage (contract 2): ``data_dir`` -> ``out_dir``.

    Loads the tokenizer with :func:`orpo_core.models.chat.load_tokenizer` (ChatML added to a
    template-less base tokenizer), tokenizes ``data_dir/train.parquet`` and
    ``data_dir/test.parquet`` with :func:`tokenize_table` (``recipe.data.max_length``,
    ``max_prompt_length``, ``num_proc``, ``on_error``), and writes the files listed in
    the module docstring into a temporary sibling folder that replaces ``out_dir``
    only when complete.

    Returns:
        the stats written to ``out_dir/stats.json``: the prepare stats
        (``data_dir/stats.json`` when present), ``tokenization`` (settings, ``dropped``
        totals, per split: see :func:`tokenize_table`, ``elapsed_s``) and ``tokenizer``
        (:func:`tokenizer_info`).

    Raises:
        RecipeError: the recipe has no ``model`` section, or ``data.max_length`` exceeds the
            model's context length (:func:`check_max_length`, before reading any data).
        TokenizerLoadError: the tokenizer cannot be loaded (see ``load_tokenizer``).
        DataError: a missing/unreadable input file or column, or a bad row (see
            :func:`tokenize_table`); names file, row and field.
    """
    from transformers import AutoTokenizer

    from orpo_core.models.chat import load_tokenizer

    t0 = time.perf_counter()
    model_cfg = recipe.require_model()
    check_max_length(recipe)
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    tables = {split: _read_pairs_table(data_dir / f"{split}.parquet") for split in SPLITS}
    tokenizer, added = load_tokenizer(model_cfg, recipe.out_dir, seed=recipe.seed)
    dcfg = recipe.data

    tmp = make_owned_temp_dir(out_dir)  # named after this process; dead owners' leftovers removed
    try:
        split_stats: dict[str, Any] = {}
        for split in SPLITS:
            path = data_dir / f"{split}.parquet"
            table, st = tokenize_table(
                tables[split],
                tokenizer,
                max_length=dcfg.max_length,
                max_prompt_length=dcfg.max_prompt_length,
                file=str(path),
                num_proc=dcfg.num_proc,
                on_error=dcfg.on_error,
            )
            pq.write_table(table, str(tmp / f"{split}.parquet"), compression="zstd")
            split_stats[split] = st
            log.info("%s: %d -> %d pairs (dropped %s)", path, st["rows_in"], st["rows_out"], st["dropped"] or "none")
        if split_stats["train"]["rows_out"] == 0:
            raise DataError(
                "no training pair left after tokenization "
                f"(dropped: {split_stats['train']['dropped']})",
                file=str(data_dir / "train.parquet"),
                reason="no_rows",
                fatal=True,
            )
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        info = tokenizer_info(tokenizer, added)
        reloaded = AutoTokenizer.from_pretrained(str(tmp / "tokenizer"), trust_remote_code=model_cfg.trust_remote_code)
        saved_fp = tokenizer_fingerprint(reloaded)
        if saved_fp != info["fingerprint"]:
            log.warning(
                "the saved tokenizer's fingerprint differs from the in-memory one (%s vs %s); "
                "recording the saved one, which is what later stages load",
                saved_fp[:16],
                info["fingerprint"][:16],
            )
            info["fingerprint"] = saved_fp
        prep_path = data_dir / "stats.json"
        stats: dict[str, Any] = json.loads(prep_path.read_text(encoding="utf-8")) if prep_path.is_file() else {}
        totals: dict[str, int] = {}
        for st in split_stats.values():
            for k, v in st["dropped"].items():
                totals[k] = totals.get(k, 0) + v
        stats["tokenization"] = {
            "max_length": dcfg.max_length,
            "max_prompt_length": dcfg.max_prompt_length,
            "truncation": "prompt cut from the left to max_prompt_length, then completions to max_length - prompt",
            "bos_prepended": bool(bos_prefix(tokenizer)),
            "dropped": dict(sorted(totals.items())),
            **split_stats,
            "elapsed_s": round(time.perf_counter() - t0, 3),
        }
        stats["tokenizer"] = info
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=False, default=str), encoding="utf-8")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the complete ``tmp`` folder to ``out_dir`` in one atomic exchange
    (:func:`orpo_core.io.replace_dir`; the old ``out_dir`` is removed after the swap)."""
    replace_dir(tmp, out_dir)

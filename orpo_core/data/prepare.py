"""The data preparation stage: load -> normalize -> binarize -> clean -> mix -> split -> Parquet.

:func:`prepare_dataset` reads every source of ``recipe.data``, normalizes each row
to the pair schema (:mod:`orpo_core.data.schema`), drops unusable pairs, mixes
the sources, splits train/test and writes, atomically::

    <out_dir>/train.parquet   pyarrow, zstd, PAIR_SCHEMA
    <out_dir>/test.parquet
    <out_dir>/stats.json

Order of operations (each drop is counted under its reason):

1. per row: read (``malformed_json``, ``not_utf8``), normalize / binarize
   (row-level ``DataError`` reasons, or ``tie`` / ``below_margin`` / ``unscored`` /
   ``prompt_mismatch`` / ``identical`` / ``empty_completion`` from :class:`DropRow`);
2. per pair: ``empty_prompt``, ``empty_completion`` (an empty or whitespace-only
   message), ``identical`` (same chosen and rejected after stripping),
   ``score_margin`` (both scores known and ``score_chosen - score_rejected <
   data.min_score_margin``; pairs without scores are kept);
3. ``duplicate``: exact (prompt, chosen, rejected) duplicates over all sources,
   first occurrence kept (``data.dedup``);
4. ``max_rows``: a seeded random sample of at most ``max_rows`` pairs per source;
5. ``weight_sampling``: when any source has a ``weight`` (sources without one
   count as weight 1), each source is sampled (seeded, without replacement) to
   ``weight / sum(weights)`` of the mix, whose size is the largest the sources
   can supply without repeating rows;
6. split: a source with ``test_split`` takes its test rows from that split (all
   its main-split rows go to train; test rows go through steps 1-3 only); other
   sources are split with ``data.test_size`` per source, grouped by prompt so the
   same prompt never lands in both train and test (seeded).

Accounting in ``stats.json``: ``rows_read + pairs_added_by_binarize ==
rows_kept + dropped_total`` (``pairs_added_by_binarize`` is the number of extra
pairs when ``all_pairs`` turns one row into several; 0 otherwise), overall, per
source and per input split.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
import shutil
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from orpo_core.config import Recipe, SourceConfig
from orpo_core.data.errors import NO_ROWS, DataError, DropRow, RowRef
from orpo_core.data.formats import (
    EMPTY_COMPLETION,
    IDENTICAL,
    ColumnMap,
    Normalizer,
    resolve_file_format,
)
from orpo_core.data.loading import RawSource, open_source
from orpo_core.data.schema import (
    check_completion,
    check_prompt,
    to_messages,
    to_score,
    write_pairs,
)

log = logging.getLogger(__name__)

STATS_VERSION = 1
EMPTY_PROMPT = "empty_prompt"
SCORE_MARGIN = "score_margin"
DUPLICATE = "duplicate"
MAX_ROWS = "max_rows"
WEIGHT_SAMPLING = "weight_sampling"
MAX_ERROR_EXAMPLES = 3
_SAMPLE_ROWS = 50  # rows looked at to infer JSON columns and detect the format


def derived_seed(seed: int, *parts: object) -> int:
    """A stable 63-bit seed from the recipe seed and a purpose (not Python's salted ``hash``)."""
    h = hashlib.sha256("|".join(str(p) for p in (seed, *parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") >> 1


# --------------------------------------------------------------------------- bookkeeping
@dataclass
class SplitCounts:
    """Counts for one input split of one source (``kept`` = rows in the output files)."""

    read: int = 0
    pairs_added_by_binarize: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "pairs_added_by_binarize": self.pairs_added_by_binarize,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "dropped_total": sum(self.dropped.values()),
        }


@dataclass
class Pair:
    """A normalized pair with bookkeeping (which source and input split it came from)."""

    row: dict[str, Any]
    source_idx: int
    split: str  # "train" (the source's main split) or "test" (its test_split)
    order: int


@dataclass
class SourceState:
    src: SourceConfig
    label: str
    format: str | None = None  # the one format of all its files, or "mixed"
    files: list[str] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)  # file -> format
    counts: dict[str, SplitCounts] = field(default_factory=dict)
    binarize: Counter = field(default_factory=Counter)
    error_examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    out: Counter = field(default_factory=Counter)  # rows per output split


# --------------------------------------------------------------------------- reading
def _synthetic_records(src: SourceConfig, seed: int) -> tuple[str, Iterator[tuple[RowRef, Any]]]:
    from orpo_core.synthetic import generate_arithmetic

    cfg = src.synthetic
    assert cfg is not None
    name = f"synthetic:{cfg.task}"
    rows = generate_arithmetic(cfg.n_rows, cfg.seed if cfg.seed is not None else seed)
    return name, ((RowRef(name, i, "row"), r) for i, r in enumerate(rows))


def _normalize_synthetic(rec: dict[str, Any], ref: RowRef) -> list[dict[str, Any]]:
    try:
        prompt = check_prompt(to_messages(rec["prompt"], "prompt", "user"))
        chosen = check_completion(to_messages(rec["chosen"], "chosen", "assistant"), "chosen")
        rejected = check_completion(to_messages(rec["rejected"], "rejected", "assistant"), "rejected")
        return [
            {
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "score_chosen": to_score(rec.get("score_chosen"), "score_chosen"),
                "score_rejected": to_score(rec.get("score_rejected"), "score_rejected"),
                "source": rec.get("source"),
            }
        ]
    except DataError as e:
        raise e.at(ref) from None


def _peek(
    records: Iterator[tuple[RowRef, Any]], n: int
) -> tuple[list[tuple[RowRef, Any]], Iterator[tuple[RowRef, Any]]]:
    """Buffer records until ``n`` valid ones (or the end); return the buffer and the rest."""
    buf: list[tuple[RowRef, Any]] = []
    valid = 0
    for item in records:
        buf.append(item)
        if isinstance(item[1], dict):
            valid += 1
            if valid >= n:
                break
    return buf, records


def _read_split(recipe: Recipe, st: SourceState, idx: int, which: str, pairs: list[Pair]) -> None:
    """Read one input split of one source into ``pairs``, counting drops in ``st``."""
    data = recipe.data
    src = st.src
    counts = st.counts.setdefault(which, SplitCounts())
    rng = random.Random(
        derived_seed(src.binarize.seed if src.binarize.seed is not None else recipe.seed, "binarize", idx, which)
    )

    if src.synthetic is not None:
        name, records = _synthetic_records(src, recipe.seed)
        st.format = "synthetic"
        st.files = [name]
        st.formats[name] = "synthetic"
        _consume(data.on_error, st, counts, records, _normalize_synthetic, idx, which, pairs)
        return
    raw: RawSource = open_source(src, which, data.cache_dir)
    cmap = ColumnMap(src.columns, raw.name)
    for part in raw.parts:
        buf, rest = _peek(part.records, _SAMPLE_ROWS)
        sample = [r for _, r in buf if isinstance(r, dict)]
        if not sample:  # every row is unreadable: the format cannot be known, so this is fatal
            if buf and data.on_error == "raise":
                raise buf[0][1]
            first = f" (first: {buf[0][1]})" if buf else ""
            raise DataError(
                f"no readable record in {len(buf)} rows{first}", file=part.name, reason=NO_ROWS, fatal=True
            )
        first_ref = next(ref for ref, r in buf if isinstance(r, dict))
        layout = resolve_file_format(src, cmap, part.columns, sample, first_ref, part.name)
        st.formats[part.name] = layout.fmt
        st.files.append(part.name)
        normalizer = Normalizer(layout.fmt, cmap, src, rng, st.binarize, layout=layout)
        _consume(data.on_error, st, counts, itertools.chain(buf, rest), normalizer, idx, which, pairs)
    fmts = set(st.formats.values())
    st.format = fmts.pop() if len(fmts) == 1 else "mixed"


def _consume(
    on_error: str,
    st: SourceState,
    counts: SplitCounts,
    records: Iterator[tuple[RowRef, Any]],
    normalize: Callable[[Any, RowRef], list[dict[str, Any]]],
    idx: int,
    which: str,
    pairs: list[Pair],
) -> None:
    """Normalize ``records`` into ``pairs``; row-level errors raise or are counted (``on_error``)."""
    for ref, rec in records:
        counts.read += 1
        try:
            if isinstance(rec, DataError):
                raise rec
            rows = normalize(rec, ref)
        except DataError as e:
            if e.fatal or on_error == "raise":
                raise
            counts.dropped[e.reason] += 1
            if len(st.error_examples[e.reason]) < MAX_ERROR_EXAMPLES:
                st.error_examples[e.reason].append(str(e))
            continue
        except DropRow as d:
            counts.dropped[d.reason] += 1
            continue
        counts.pairs_added_by_binarize += len(rows) - 1
        for row in rows:
            row["source"] = row.get("source") or st.label
            row["origin"] = ref.origin
            pairs.append(Pair(row, idx, which, len(pairs)))


# --------------------------------------------------------------------------- cleaning
def _clean_reason(row: dict[str, Any], min_margin: float | None) -> str | None:
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if not prompt[-1]["content"].strip():
        return EMPTY_PROMPT
    if not chosen or not rejected or any(not m["content"].strip() for m in chosen + rejected):
        return EMPTY_COMPLETION
    if [m["content"].strip() for m in chosen] == [m["content"].strip() for m in rejected]:
        return IDENTICAL
    sc, sr = row.get("score_chosen"), row.get("score_rejected")
    if min_margin is not None and sc is not None and sr is not None and sc - sr < min_margin:
        return SCORE_MARGIN
    return None


def _pair_key(row: dict[str, Any]) -> bytes:
    payload = json.dumps([row["prompt"], row["chosen"], row["rejected"]], ensure_ascii=False, sort_keys=True)
    return hashlib.sha1(payload.encode()).digest()


def _prompt_key(row: dict[str, Any]) -> str:
    return json.dumps(row["prompt"], ensure_ascii=False, sort_keys=True)


def _sample(items: list[Pair], k: int, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Seeded sample of ``k`` items, returned in original order, plus the rest."""
    if k >= len(items):
        return items, []
    chosen = set(random.Random(seed).sample(range(len(items)), k))
    keep = [p for i, p in enumerate(items) if i in chosen]
    rest = [p for i, p in enumerate(items) if i not in chosen]
    return keep, rest


def mix_targets(available: list[int], weights: list[float]) -> list[int]:
    """Rows to take from each source so shares follow ``weights`` without repeating rows.

    The mix size is ``N = min_i available_i / share_i`` (the largest mix every
    source can supply); source ``i`` contributes ``round(share_i * N)`` rows,
    capped at ``available_i``.

    Returns:
        one row count per source.
    """
    total_w = sum(weights)
    shares = [w / total_w for w in weights]
    n_mix = min(a / s for a, s in zip(available, shares))
    return [min(a, int(round(s * n_mix))) for a, s in zip(available, shares)]


def split_by_prompt(items: list[Pair], test_size: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Seeded train/test split in which all pairs sharing a prompt stay together.

    Prompt groups are shuffled and moved to test until it holds at least
    ``round(test_size * n)`` pairs (at least one when ``test_size > 0`` and there
    are two or more groups); train is never emptied.

    Returns:
        (train, test), each in original order.
    """
    if test_size <= 0 or not items:
        return items, []
    groups: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(items):
        groups[_prompt_key(p.row)].append(i)
    keys = list(groups)
    if len(keys) < 2:
        return items, []
    random.Random(seed).shuffle(keys)
    target = max(1, int(round(test_size * len(items))))
    test_idx: set[int] = set()
    for k in keys[:-1]:  # the last group always stays in train
        if len(test_idx) >= target:
            break
        test_idx.update(groups[k])
    train = [p for i, p in enumerate(items) if i not in test_idx]
    test = [p for i, p in enumerate(items) if i in test_idx]
    return train, test


# --------------------------------------------------------------------------- main
def _labels(sources: list[SourceConfig]) -> list[str]:
    seen: Counter = Counter()
    out = []
    for s in sources:
        base = s.display_name
        seen[base] += 1
        out.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return out


def prepare_dataset(recipe: Recipe, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Build ``train.parquet``, ``test.parquet`` and ``stats.json`` in ``out_dir``.

    Args:
        recipe: the validated recipe; uses ``recipe.data`` and ``recipe.seed``.
        out_dir: the stage folder (normally ``recipe.out_dir / "data"``). It is
            replaced as a whole only after every file was written to a temporary
            sibling folder; on error nothing is written and an existing folder is
            left untouched.

    Returns:
        the stats dict also written to ``stats.json`` (see module docstring).

    Raises:
        DataError: bad input (naming file, row or line, and field) when
            ``data.on_error`` is ``raise`` or the problem is whole-source (empty file,
            missing column, unreadable file); ``no_rows`` when no training pair is left.
    """
    data = recipe.data
    out_dir = Path(out_dir)
    labels = _labels(data.sources)
    states = [SourceState(src, label) for src, label in zip(data.sources, labels)]

    pairs: list[Pair] = []
    for idx, st in enumerate(states):
        _read_split(recipe, st, idx, "train", pairs)
        if st.src.test_split is not None:
            if st.src.synthetic is not None:
                raise DataError(
                    "test_split is not supported for synthetic sources", file=st.label, reason="bad_config", fatal=True
                )
            _read_split(recipe, st, idx, "test", pairs)

    def drop(p: Pair, reason: str) -> None:
        states[p.source_idx].counts[p.split].dropped[reason] += 1

    # 2-3. pair-level cleaning and global dedup
    seen: set[bytes] = set()
    clean: list[Pair] = []
    for p in pairs:
        reason = _clean_reason(p.row, data.min_score_margin)
        if reason is None and data.dedup:
            key = _pair_key(p.row)
            if key in seen:
                reason = DUPLICATE
            seen.add(key)
        if reason is None:
            clean.append(p)
        else:
            drop(p, reason)
    del seen

    # 4. max_rows per source (main split only)
    per_source: list[list[Pair]] = [[] for _ in states]
    test_from_split: list[Pair] = []
    for p in clean:
        (test_from_split if p.split == "test" else per_source[p.source_idx]).append(p)
    for i, st in enumerate(states):
        if st.src.max_rows is not None:
            per_source[i], rest = _sample(per_source[i], st.src.max_rows, derived_seed(recipe.seed, "max_rows", i))
            for p in rest:
                drop(p, MAX_ROWS)

    # 5. weighted mix
    if any(st.src.weight is not None for st in states):
        weights = [st.src.weight if st.src.weight is not None else 1.0 for st in states]
        targets = mix_targets([len(x) for x in per_source], weights)
        for i, k in enumerate(targets):
            per_source[i], rest = _sample(per_source[i], k, derived_seed(recipe.seed, "weight", i))
            for p in rest:
                drop(p, WEIGHT_SAMPLING)

    # 6. split
    train: list[Pair] = []
    test: list[Pair] = list(test_from_split)
    for i, st in enumerate(states):
        if st.src.test_split is not None:
            train.extend(per_source[i])
        else:
            tr, te = split_by_prompt(per_source[i], data.test_size, derived_seed(recipe.seed, "split", i))
            train.extend(tr)
            test.extend(te)
    train.sort(key=lambda p: p.order)
    test.sort(key=lambda p: p.order)
    for name, rows in (("train", train), ("test", test)):
        for p in rows:
            st = states[p.source_idx]
            st.counts[p.split].kept += 1
            st.out[name] += 1

    stats = _build_stats(recipe, states, train, test)
    if not train:
        raise DataError(
            f"no training pairs left after cleaning (read {stats['rows_read']}, dropped {stats['dropped']})",
            file=", ".join(labels),
            reason=NO_ROWS,
            fatal=True,
        )
    _write_atomically(out_dir, train, test, stats)
    log.info(
        "prepared %d train / %d test pairs from %d rows (%s dropped: %s)",
        len(train),
        len(test),
        stats["rows_read"],
        stats["dropped_total"],
        stats["dropped"],
    )
    return stats


def _split_summary(rows: list[Pair]) -> dict[str, Any]:
    by_source: Counter = Counter(p.row["source"] for p in rows)
    return {
        "rows": len(rows),
        "by_source": dict(sorted(by_source.items())),
        "multi_turn": sum(1 for p in rows if sum(m["role"] == "user" for m in p.row["prompt"]) > 1),
        "with_system": sum(1 for p in rows if p.row["prompt"][0]["role"] == "system"),
        "with_scores": sum(
            1 for p in rows if p.row["score_chosen"] is not None and p.row["score_rejected"] is not None
        ),
    }


def _build_stats(recipe: Recipe, states: list[SourceState], train: list[Pair], test: list[Pair]) -> dict[str, Any]:
    total = SplitCounts()
    sources: dict[str, Any] = {}
    errors: dict[str, list[str]] = {}
    for st in states:
        src_total = SplitCounts()
        for c in st.counts.values():
            src_total.read += c.read
            src_total.pairs_added_by_binarize += c.pairs_added_by_binarize
            src_total.kept += c.kept
            src_total.dropped.update(c.dropped)
        total.read += src_total.read
        total.pairs_added_by_binarize += src_total.pairs_added_by_binarize
        total.kept += src_total.kept
        total.dropped.update(src_total.dropped)
        entry = {
            "path": st.src.path,
            "synthetic": st.src.synthetic.model_dump() if st.src.synthetic is not None else None,
            "format": st.format,
            "formats": st.formats,
            "files": st.files,
            **src_total.as_dict(),
            "inputs": {
                (st.src.split if w == "train" else str(st.src.test_split)) if st.src.path else w: c.as_dict()
                for w, c in st.counts.items()
            },
            "outputs": {"train": st.out["train"], "test": st.out["test"]},
        }
        if st.binarize:
            entry["binarize"] = {
                "strategy": st.src.binarize.strategy,
                "score": st.src.binarize.score,
                **dict(st.binarize),
            }
        sources[st.label] = entry
        for reason, msgs in st.error_examples.items():
            errors.setdefault(reason, []).extend(msgs)
    t = total.as_dict()
    return {
        "version": STATS_VERSION,
        "data_hash": recipe.section_hash("data", "seed"),
        "seed": recipe.seed,
        "rows_read": t["read"],
        "pairs_added_by_binarize": t["pairs_added_by_binarize"],
        "rows_kept": t["kept"],
        "dropped": t["dropped"],
        "dropped_total": t["dropped_total"],
        "accounting": "rows_read + pairs_added_by_binarize == rows_kept + dropped_total",
        "accounting_ok": t["read"] + t["pairs_added_by_binarize"] == t["kept"] + t["dropped_total"],
        "splits": {"train": _split_summary(train), "test": _split_summary(test)},
        "sources": sources,
        "error_examples": errors,
        "settings": {
            "on_error": recipe.data.on_error,
            "dedup": recipe.data.dedup,
            "test_size": recipe.data.test_size,
            "min_score_margin": recipe.data.min_score_margin,
        },
    }


def _write_atomically(out_dir: Path, train: list[Pair], test: list[Pair], stats: dict[str, Any]) -> None:
    """Write into a temporary sibling folder, then swap it in place of ``out_dir``."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_pairs([p.row for p in train], tmp / "train.parquet")
        write_pairs([p.row for p in test], tmp / "test.parquet")
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out_dir.exists():
            old.rename(out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)

"""The data preparation stage: load -> normalize -> binarize -> clean -> mix -> split -> Parquet.

:func:`prepare_dataset` reads every source of ``recipe.data``, normalizes each row
to the pair schema (:mod:`orpo_core.data.schema`), drops unusable pairs, mixes
the sources, splits train/test and writes, atomically::

    <out_dir>/train.parquet   pyarrow, zstd, PAIR_SCHEMA
    <out_dir>/test.parquet
    <out_dir>/stats.json

Order of operations (each drop is counted under its reason):

1. per row: read (``malformed_json``, ``not_utf8``, ``duplicate_key``, ``malformed_csv``),
   check against the file's format (``foreign_keys``), normalize / binarize
   (row-level ``DataError`` reasons, or ``tie`` / ``below_margin`` / ``unscored`` /
   ``prompt_mismatch`` / ``identical`` / ``empty_completion`` from :class:`DropRow`);
2. per pair: ``empty_prompt``, ``empty_completion`` (an empty or whitespace-only
   message), ``identical`` (same chosen and rejected after stripping),
   ``score_margin`` (both scores known and ``score_chosen - score_rejected <
   data.min_score_margin``; pairs without scores are kept);
3. ``duplicate``: exact (prompt, chosen, rejected) duplicates over all sources,
   first occurrence kept (``data.dedup``); then ``contaminated``: pairs whose prompt (all its
   messages) shares a word 13-gram with a prompt of ``data.decontaminate`` (a benchmark's
   prompts, e.g. Google's IFEval input file; :mod:`orpo_core.data.synthetic.instructions.decontaminate`);
4. ``max_rows``: a seeded random sample of at most ``max_rows`` pairs per source;
5. ``weight_sampling``: when any source has a ``weight`` (sources without one
   count as weight 1), each source is sampled (seeded, without replacement) to
   ``weight / sum(weights)`` of the mix, whose size is the largest the sources
   can supply without repeating rows;
6. split: a source with ``test_split`` takes its test rows from that split (all
   its main-split rows go to train; test rows go through steps 1-3 only); so does
   the ``instructions`` synthetic source, whose test rows are the generator's
   held-out split (``round(n_rows * data.test_size)`` rows); other
   sources are split with ``data.test_size`` per source, grouped by prompt so the
   same prompt never lands in both train and test (seeded).

Memory: steps 1-2 run chunk by chunk (:mod:`orpo_core.data.chunked`, in
``data.num_proc`` processes for large files); the pairs that pass them are spilled
as Arrow batches to a file in the temporary output folder, and steps 3-6 work on
per-pair arrays (keys, source, flags: about 50 bytes a pair), so no step holds one
Python object per row. The Parquet files are then written batch by batch from the
spill, in input order.

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
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from orpo_core.io import staging_dir
from orpo_core.stages import fields_hash
from orpo_core.config import Recipe, SourceConfig
from orpo_core.data.chunked import (
    EMPTY_PROMPT,
    KEY_DTYPE,
    MAX_ERROR_EXAMPLES,
    SCORE_MARGIN,
    Chunk,
    ChunkContext,
    ChunkResult,
    ChunkRunner,
    jsonl_chunks,
    parquet_chunks,
    record_chunks,
)
from orpo_core.data.errors import NO_ROWS, DataError, RowRef
from orpo_core.data.formats import ColumnMap, resolve_file_format
from orpo_core.data.loading import JSONL_SUFFIXES, PARQUET_SUFFIXES, RawFile, RawSource, _has_suffix, open_source
from orpo_core.data.schema import PAIR_SCHEMA
from orpo_core.data.synthetic.instructions.decontaminate import NgramIndex, benchmark_info

log = logging.getLogger(__name__)

STATS_VERSION = 1
DUPLICATE = "duplicate"
MAX_ROWS = "max_rows"
WEIGHT_SAMPLING = "weight_sampling"
CONTAMINATED = "contaminated"
ROW_GROUP_ROWS = 1 << 16  # rows per Parquet row group written
_SAMPLE_ROWS = 50  # rows looked at to infer JSON columns and detect the format

__all__ = ["prepare_dataset", "mix_targets", "split_groups", "derived_seed", "EMPTY_PROMPT", "SCORE_MARGIN"]


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


class PairStore:
    """The pairs that passed steps 1-2: Arrow batches spilled to ``path`` (IPC stream,
    lz4) plus per-pair arrays for the global steps.

    Attributes (after :meth:`finish`; one entry per stored pair, in input order):
        source_idx: int32 index of the source; is_test: bool, read from the source's
        ``test_split``; pair_key / prompt_key: ``S20`` digests; source_id: int32 index
        into ``source_names`` (the ``source`` column); multi_turn / with_system /
        with_scores: bool.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._parts: dict[str, list[np.ndarray]] = defaultdict(list)
        self.source_names: list[str] = []
        self._source_ids: dict[str, int] = {}
        self.n = 0

    def add(self, res: ChunkResult, source_idx: int, is_test: bool) -> None:
        batch = res.batch
        if batch is None or batch.num_rows == 0:
            return
        if self._writer is None:
            opts = pa.ipc.IpcWriteOptions(compression="lz4")
            self._writer = pa.ipc.new_stream(str(self.path), PAIR_SCHEMA, options=opts)
        self._writer.write_batch(batch)
        n = batch.num_rows
        enc = pc.dictionary_encode(batch.column("source"))
        ids = np.array([self._source_id(s) for s in enc.dictionary.to_pylist()], dtype=np.int32)
        self._parts["source_id"].append(ids[enc.indices.to_numpy(zero_copy_only=False)])
        self._parts["source_idx"].append(np.full(n, source_idx, dtype=np.int32))
        self._parts["is_test"].append(np.full(n, is_test, dtype=bool))
        for name in ("pair_key", "prompt_key", "multi_turn", "with_system", "with_scores"):
            self._parts[name].append(getattr(res, name))
        self.n += n

    def _source_id(self, name: str) -> int:
        if name not in self._source_ids:
            self._source_ids[name] = len(self.source_names)
            self.source_names.append(name)
        return self._source_ids[name]

    def finish(self) -> None:
        """Close the spill file and concatenate the per-pair arrays."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        dtypes = {"source_id": np.int32, "source_idx": np.int32, "is_test": bool, "pair_key": KEY_DTYPE,
                  "prompt_key": KEY_DTYPE, "multi_turn": bool, "with_system": bool, "with_scores": bool}
        for name, dt in dtypes.items():
            parts = self._parts.pop(name, [])
            setattr(self, name, np.concatenate(parts) if parts else np.zeros(0, dtype=dt))

    def batches(self) -> Iterator[pa.RecordBatch]:
        """The spilled batches, in input order (read one at a time, not memory-mapped)."""
        if not self.path.exists():
            return
        with pa.OSFile(str(self.path)) as f:
            yield from pa.ipc.open_stream(f)


# --------------------------------------------------------------------------- reading
def _own_test_split(src: SourceConfig) -> bool:
    """True when the source supplies its own test rows (``test_split``, or the instruction generator's held-out split)."""
    return src.test_split is not None or (src.synthetic is not None and src.synthetic.task == "instructions")


def _synthetic_records(
    src: SourceConfig, seed: int, which: str = "train", test_size: float = 0.0
) -> tuple[str, Iterator[tuple[RowRef, Any]]]:
    """Rows of a synthetic source. ``instructions``: ``which`` picks the generator's train or
    held-out split; ``round(n_rows * test_size)`` rows are held out, the rest train."""
    cfg = src.synthetic
    assert cfg is not None
    name = f"synthetic:{cfg.task}"
    seed = cfg.seed if cfg.seed is not None else seed
    if cfg.task == "instructions":
        from orpo_core.data.synthetic.instructions.generator import generate_instructions

        n_test = int(round(cfg.n_rows * test_size))
        n = n_test if which == "test" else cfg.n_rows - n_test
        rows = generate_instructions(n, seed, split="test" if which == "test" else "train")
        if which == "test":
            name += "/heldout"
    else:
        from orpo_core.data.synthetic.arithmetic import generate_arithmetic

        rows = generate_arithmetic(cfg.n_rows, seed)
    return name, ((RowRef(name, i, "row"), r) for i, r in enumerate(rows))


def _onpolicy_records(recipe: Recipe) -> tuple[str, Iterator[tuple[RowRef, Any]]]:
    """Rows of the run's ``generate`` stage (``<output_dir>/onpolicy/pairs.jsonl``, already normalized).

    Raises:
        DataError: the file does not exist (the generate stage has not run; fatal).
    """
    from orpo_core.data.onpolicy import pairs_file

    path = pairs_file(recipe.out_dir / "onpolicy")
    if not path.is_file():
        raise DataError("on-policy pairs not found: run the generate stage first (`orpo run` does)",
                        file=str(path), reason="missing_file", fatal=True)
    name = str(path)

    def rows() -> Iterator[tuple[RowRef, Any]]:
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                yield RowRef(name, i, "line"), json.loads(line)

    return name, rows()


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


def _chunks_of(part: RawFile, buf: list, rest: Iterator) -> Iterator[Chunk]:
    """The chunks of one file: raw line blocks for local JSON Lines, record batches for
    local Parquet (both re-read from the start: the sample was only for detection),
    record lists otherwise."""
    if part.path is not None and _has_suffix(part.path, JSONL_SUFFIXES):
        getattr(rest, "close", lambda: None)()
        return jsonl_chunks(part.path, part.name)
    if part.path is not None and _has_suffix(part.path, PARQUET_SUFFIXES):
        getattr(rest, "close", lambda: None)()
        return parquet_chunks(part.path, part.name)
    return record_chunks(itertools.chain(buf, rest), part.name)


def _read_split(
    recipe: Recipe, st: SourceState, idx: int, which: str, store: PairStore, runner: ChunkRunner
) -> None:
    """Read one input split of one source into ``store``, counting reads and drops in ``st``."""
    data = recipe.data
    src = st.src
    counts = st.counts.setdefault(which, SplitCounts())
    rng = random.Random(
        derived_seed(src.binarize.seed if src.binarize.seed is not None else recipe.seed, "binarize", idx, which)
    )

    if src.onpolicy is not None or src.synthetic is not None:  # rows made by the project, already normalized
        kind = "onpolicy" if src.onpolicy is not None else "synthetic"
        name, records = (
            _onpolicy_records(recipe) if kind == "onpolicy" else _synthetic_records(src, recipe.seed, which, data.test_size)
        )
        st.format = kind
        st.files.append(name)
        st.formats[name] = kind
        ctx = ChunkContext("synthetic", None, None, None, st.label, data.on_error, data.min_score_margin)
        _collect(st, counts, runner.run(ctx, record_chunks(records, name), rng), store, idx, which)
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
        ctx = ChunkContext(layout.fmt, cmap, src, layout, st.label, data.on_error, data.min_score_margin)
        _collect(st, counts, runner.run(ctx, _chunks_of(part, buf, rest), rng), store, idx, which)
    fmts = set(st.formats.values())
    st.format = fmts.pop() if len(fmts) == 1 else "mixed"


def _collect(
    st: SourceState, counts: SplitCounts, results: Iterator[ChunkResult], store: PairStore, idx: int, which: str
) -> None:
    """Add chunk results (in input order) to the counts and the store; raise the first row error."""
    for res in results:
        counts.read += res.read
        counts.pairs_added_by_binarize += res.pairs_added_by_binarize
        counts.dropped.update(res.dropped)
        st.binarize.update(res.binarize)
        for reason, msgs in res.examples.items():
            ex = st.error_examples[reason]
            ex.extend(msgs[: max(0, MAX_ERROR_EXAMPLES - len(ex))])
        if res.error is not None:
            raise res.error
        store.add(res, idx, which == "test")


# --------------------------------------------------------------------------- global steps
def _sample_mask(n: int, k: int, seed: int) -> np.ndarray:
    """Boolean mask of a seeded sample of ``k`` of ``n`` positions (all when ``k >= n``);
    the positions are ``random.Random(seed).sample(range(n), k)``."""
    mask = np.ones(n, dtype=bool)
    if k < n:
        mask[:] = False
        mask[np.fromiter(random.Random(seed).sample(range(n), k), dtype=np.int64, count=k)] = True
    return mask


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


def split_groups(keys: np.ndarray, test_size: float, seed: int) -> np.ndarray:
    """Seeded train/test split in which all pairs sharing a prompt key stay together.

    Prompt groups, in order of first appearance, are shuffled (``random.Random(seed)``)
    and moved to test until it holds at least ``round(test_size * n)`` pairs (at least
    one when ``test_size > 0`` and there are two or more groups); the last group in
    shuffled order always stays in train, so train is never emptied.

    Args:
        keys: one prompt key per pair (any numpy dtype ``np.unique`` sorts), in input order.

    Returns:
        a boolean mask, True for the pairs that go to test.
    """
    n = len(keys)
    test = np.zeros(n, dtype=bool)
    if test_size <= 0 or n == 0:
        return test
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    n_groups = len(first)
    if n_groups < 2:
        return test
    rank = np.empty(n_groups, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(n_groups)
    group = rank[inverse.reshape(-1)]  # group number in order of first appearance
    sizes = np.bincount(group, minlength=n_groups)
    order = list(range(n_groups))
    random.Random(seed).shuffle(order)
    target = max(1, int(round(test_size * n)))
    chosen = np.zeros(n_groups, dtype=bool)
    count = 0
    for g in order[:-1]:
        if count >= target:
            break
        chosen[g] = True
        count += int(sizes[g])
    return chosen[group]


def _contaminated(store: PairStore, benchmark: str) -> np.ndarray:
    """Per stored pair: True when its prompt text shares a word 13-gram with a benchmark prompt.

    Raises:
        DataError: the benchmark file is missing or malformed (``bad_config``, fatal).
    """

    try:
        index = NgramIndex.from_ifeval(Path(benchmark).expanduser())
    except (OSError, ValueError) as e:
        raise DataError(f"data.decontaminate: {e}", file=str(benchmark), reason="bad_config", fatal=True) from e
    flags: list[bool] = []
    for batch in store.batches():
        for msgs in batch.column("prompt").to_pylist():
            flags.append(index.shares_ngram("\n".join(m["content"] for m in msgs or [])))
    return np.array(flags, dtype=bool)


def _select(recipe: Recipe, states: list[SourceState], store: PairStore) -> np.ndarray:
    """Steps 3-6 on the stored pairs: returns 0 (dropped), 1 (train) or 2 (test) per pair,
    counting drops in ``states``."""
    data = recipe.data
    n = store.n
    src, is_test = store.source_idx, store.is_test
    alive = np.ones(n, dtype=bool)

    def drop(mask: np.ndarray, reason: str) -> None:
        idx = np.flatnonzero(mask)
        if len(idx) == 0:
            return
        combo = src[idx].astype(np.int64) * 2 + is_test[idx]
        values, counts = np.unique(combo, return_counts=True)
        for v, c in zip(values.tolist(), counts.tolist()):
            states[v // 2].counts["test" if v % 2 else "train"].dropped[reason] += c
        alive[idx] = False

    # 3. global dedup, first occurrence kept
    if data.dedup and n:
        _, first = np.unique(store.pair_key, return_index=True)
        dup = np.ones(n, dtype=bool)
        dup[first] = False
        drop(dup, DUPLICATE)

    # 3b. decontamination against a benchmark's prompts
    if data.decontaminate and n:
        drop(_contaminated(store, data.decontaminate) & alive, CONTAMINATED)

    def main_rows(i: int) -> np.ndarray:
        return np.flatnonzero(alive & (src == i) & ~is_test)

    # 4. max_rows per source (main split only)
    for i, st in enumerate(states):
        if st.src.max_rows is not None:
            rows = main_rows(i)
            keep = _sample_mask(len(rows), st.src.max_rows, derived_seed(recipe.seed, "max_rows", i))
            mask = np.zeros(n, dtype=bool)
            mask[rows[~keep]] = True
            drop(mask, MAX_ROWS)

    # 5. weighted mix
    if any(st.src.weight is not None for st in states):
        weights = [st.src.weight if st.src.weight is not None else 1.0 for st in states]
        per_source = [main_rows(i) for i in range(len(states))]
        targets = mix_targets([len(x) for x in per_source], weights)
        for i, k in enumerate(targets):
            rows = per_source[i]
            keep = _sample_mask(len(rows), k, derived_seed(recipe.seed, "weight", i))
            mask = np.zeros(n, dtype=bool)
            mask[rows[~keep]] = True
            drop(mask, WEIGHT_SAMPLING)

    # 6. split
    out = np.zeros(n, dtype=np.int8)
    out[alive & is_test] = 2
    for i, st in enumerate(states):
        rows = main_rows(i)
        if _own_test_split(st.src):
            out[rows] = 1
        else:
            to_test = split_groups(store.prompt_key[rows], data.test_size, derived_seed(recipe.seed, "split", i))
            out[rows] = np.where(to_test, 2, 1)
    for i, st in enumerate(states):
        for which, flag in (("train", False), ("test", True)):
            if which in st.counts:
                sel = (src == i) & (is_test == flag)
                st.counts[which].kept += int(np.count_nonzero(sel & (out > 0)))
        st.out["train"] += int(np.count_nonzero((src == i) & (out == 1)))
        st.out["test"] += int(np.count_nonzero((src == i) & (out == 2)))
    return out


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
        recipe: the validated recipe; uses ``recipe.data`` (``num_proc`` processes read
            large files) and ``recipe.seed``.
        out_dir: the stage folder (normally ``recipe.out_dir / "data"``). Everything,
            the temporary spill of normalized pairs included, is written to a temporary
            sibling folder that replaces ``out_dir`` as a whole at the end; on error it
            is removed and an existing ``out_dir`` is left untouched.

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

    with _staging(out_dir) as tmp, ChunkRunner(data.num_proc) as runner:
        store = PairStore(tmp / ".pairs.arrows")
        for idx, st in enumerate(states):
            _read_split(recipe, st, idx, "train", store, runner)
            if st.src.test_split is not None and st.src.synthetic is not None:
                raise DataError(
                    "test_split is not supported for synthetic sources",
                    file=st.label,
                    reason="bad_config",
                    fatal=True,
                )
            if _own_test_split(st.src) and (st.src.synthetic is None or data.test_size > 0):
                _read_split(recipe, st, idx, "test", store, runner)
        runner.close()
        store.finish()
        out = _select(recipe, states, store)
        stats = _build_stats(recipe, states, store, out)
        if not np.any(out == 1):
            raise DataError(
                f"no training pairs left after cleaning (read {stats['rows_read']}, dropped {stats['dropped']})",
                file=", ".join(labels),
                reason=NO_ROWS,
                fatal=True,
            )
        _write_parquet(store, out, tmp)
        store.path.unlink(missing_ok=True)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log.info(
        "prepared %d train / %d test pairs from %d rows (%s dropped: %s)",
        stats["splits"]["train"]["rows"],
        stats["splits"]["test"]["rows"],
        stats["rows_read"],
        stats["dropped_total"],
        stats["dropped"],
    )
    return stats


def _write_parquet(store: PairStore, out: np.ndarray, folder: Path) -> None:
    """Write ``train.parquet`` / ``test.parquet`` (zstd, PAIR_SCHEMA) from the spill, batch by
    batch, in input order; row groups of up to ``ROW_GROUP_ROWS`` rows."""
    writers = {
        code: pq.ParquetWriter(str(folder / f"{name}.parquet"), PAIR_SCHEMA, compression="zstd")
        for code, name in ((1, "train"), (2, "test"))
    }
    pending: dict[int, list[pa.RecordBatch]] = {1: [], 2: []}
    sizes = {1: 0, 2: 0}

    def flush(code: int) -> None:
        if pending[code]:
            writers[code].write_table(pa.Table.from_batches(pending[code], schema=PAIR_SCHEMA))
            pending[code], sizes[code] = [], 0

    try:
        offset = 0
        for batch in store.batches():
            where = out[offset : offset + batch.num_rows]
            offset += batch.num_rows
            for code in (1, 2):
                mask = where == code
                if mask.any():
                    part = batch.filter(pa.array(mask))
                    pending[code].append(part)
                    sizes[code] += part.num_rows
                    if sizes[code] >= ROW_GROUP_ROWS:
                        flush(code)
        for code in (1, 2):
            flush(code)
    finally:
        for w in writers.values():
            w.close()


def _split_summary(store: PairStore, sel: np.ndarray) -> dict[str, Any]:
    ids, counts = np.unique(store.source_id[sel], return_counts=True)
    by_source = {store.source_names[i]: int(c) for i, c in zip(ids.tolist(), counts.tolist())}
    return {
        "rows": int(np.count_nonzero(sel)),
        "by_source": dict(sorted(by_source.items())),
        "multi_turn": int(np.count_nonzero(store.multi_turn[sel])),
        "with_system": int(np.count_nonzero(store.with_system[sel])),
        "with_scores": int(np.count_nonzero(store.with_scores[sel])),
    }


def _build_stats(recipe: Recipe, states: list[SourceState], store: PairStore, out: np.ndarray) -> dict[str, Any]:
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
        "data_hash": fields_hash(recipe, "prepare"),
        "seed": recipe.seed,
        "rows_read": t["read"],
        "pairs_added_by_binarize": t["pairs_added_by_binarize"],
        "rows_kept": t["kept"],
        "dropped": t["dropped"],
        "dropped_total": t["dropped_total"],
        "accounting": "rows_read + pairs_added_by_binarize == rows_kept + dropped_total",
        "accounting_ok": t["read"] + t["pairs_added_by_binarize"] == t["kept"] + t["dropped_total"],
        "splits": {"train": _split_summary(store, out == 1), "test": _split_summary(store, out == 2)},
        "sources": sources,
        "error_examples": errors,
        "settings": {
            "on_error": recipe.data.on_error,
            "dedup": recipe.data.dedup,
            "test_size": recipe.data.test_size,
            "min_score_margin": recipe.data.min_score_margin,
            "decontaminate": benchmark_info(recipe.data.decontaminate) if recipe.data.decontaminate else None,
        },
    }




def _staging(out_dir: Path):
    """A staging folder named after this process (:func:`orpo_core.io.staging_dir`) that replaces
    ``out_dir`` in one atomic exchange when the block succeeds and is removed when it fails (an
    existing ``out_dir`` is then left untouched). Only staging folders whose owner process is
    gone are cleaned up, so two writers never delete each other's folder."""
    return staging_dir(out_dir)

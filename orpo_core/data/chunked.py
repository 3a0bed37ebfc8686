"""Chunked normalization: raw records of one file -> cleaned Arrow batches, in worker processes.

The preparation stage reads every file in chunks (about 8 MiB of JSON Lines, or 8,192
records / Parquet rows). Each chunk is turned, by :func:`process_chunk`, into:

* a :class:`pyarrow.RecordBatch` of the normalized pairs that pass the per-pair
  cleaning (``PAIR_SCHEMA``; ``origin`` and ``source`` filled in);
* small per-pair arrays for the global steps of :mod:`orpo_core.data.prepare`:
  the dedup key (SHA-1 of prompt, chosen and rejected), the prompt key (SHA-1 of the
  prompt, for the grouped split; both from :func:`pair_keys`) and three
  flags for the stats (multi-turn prompt, system turn, both scores present);
* the counts of the chunk (rows read, pairs added by binarization, drops by reason,
  binarization counters) and the first error examples, or the first row error when
  ``on_error`` is ``raise``.

So the stage never holds one Python object per row: the normalized rows live in
Arrow batches (spilled to disk by the caller) and the global steps work on the
per-pair arrays (about 50 bytes a pair).

With ``data.num_proc > 1`` the chunks of a file larger than one chunk go to a pool of
``num_proc`` spawned processes (:class:`ChunkRunner`), at most ``2 * num_proc`` in
flight, and their results are consumed in file order, so counts, error examples and
the first error raised are those of a sequential read. JSON Lines chunks travel as raw
bytes (the workers decode and parse them), Parquet chunks as Arrow record batches,
other sources as record lists. The one exception is ``ratings`` with
``best_vs_random``, whose seeded generator is consumed row after row across the whole
file: such files are always processed in the calling process.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from orpo_core.config import SourceConfig
from orpo_core.data.errors import DataError, DropRow, RowRef
from orpo_core.data.formats import EMPTY_COMPLETION, IDENTICAL, ColumnMap, FileLayout, Normalizer
from orpo_core.data.loading import Record, parse_jsonl_line
from orpo_core.data.schema import PAIR_SCHEMA, check_completion, check_prompt, to_messages, to_score

CHUNK_BYTES = 8 << 20  # JSON Lines read per chunk
CHUNK_ROWS = 8192  # records (or Parquet rows) per chunk
MAX_ERROR_EXAMPLES = 3
EMPTY_PROMPT = "empty_prompt"
SCORE_MARGIN = "score_margin"
KEY_DTYPE = "S20"  # SHA-1 digests


# --------------------------------------------------------------------------- per-pair helpers
def clean_reason(row: dict[str, Any], min_margin: float | None) -> str | None:
    """Why a normalized pair is dropped (``empty_prompt``, ``empty_completion``, ``identical``,
    ``score_margin``), or None to keep it."""
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


def _encode_messages(messages: list[dict[str, str]]) -> str:
    """An injective text form of normalized messages (length-prefixed roles and contents)."""
    parts = [f"{len(messages)}#"]
    for m in messages:
        role, content = m["role"], m["content"]
        parts.append(f"{len(role)}:{role}{len(content)}:{content}")
    return "".join(parts)


def pair_keys(row: dict[str, Any]) -> tuple[bytes, bytes]:
    """(dedup key, split-group key): SHA-1 digests of (prompt, chosen, rejected) and of the
    prompt. Two pairs get the same key exactly when their normalized messages are equal
    (up to SHA-1 collisions)."""
    prompt = _encode_messages(row["prompt"]).encode("utf-8", "surrogatepass")
    rest = (_encode_messages(row["chosen"]) + _encode_messages(row["rejected"])).encode("utf-8", "surrogatepass")
    return hashlib.sha1(prompt + rest).digest(), hashlib.sha1(prompt).digest()


def normalize_synthetic(rec: dict[str, Any], ref: RowRef) -> list[dict[str, Any]]:
    """A generator row (:mod:`orpo_core.data.synthetic.arithmetic`) as a normalized pair (its ``source`` kept)."""
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
                "constraints": rec.get("constraints"),
            }
        ]
    except DataError as e:
        raise e.at(ref) from None


# --------------------------------------------------------------------------- jobs and results
@dataclass
class ChunkContext:
    """What a worker needs to normalize the chunks of one file (pickled with each job).

    ``fmt`` is a format name or ``"synthetic"``; ``layout`` is the file's detected layout
    (None for synthetic rows).
    """

    fmt: str
    cmap: ColumnMap | None
    src: SourceConfig | None
    layout: FileLayout | None
    label: str
    on_error: str
    min_margin: float | None

    @property
    def needs_shared_rng(self) -> bool:
        """True when rows consume one seeded generator in file order (``best_vs_random``)."""
        return self.fmt == "ratings" and self.src is not None and self.src.binarize.strategy == "best_vs_random"


@dataclass
class Chunk:
    """One unit of work: ``kind`` is ``"jsonl"`` (``payload``: raw bytes of whole lines,
    ``start``: line number of the first), ``"arrow"`` (a record batch, ``start``: index of
    its first row) or ``"records"`` (a list of ``(RowRef, dict | DataError)``)."""

    kind: str
    payload: Any
    name: str
    start: int = 0

    def records(self) -> Iterator[Record]:
        if self.kind == "records":
            yield from self.payload
        elif self.kind == "arrow":
            for i, rec in enumerate(self.payload.to_pylist(), start=self.start):
                yield RowRef(self.name, i, "row"), rec
        elif self.kind == "jsonl":
            from orpo_core.data.loading import _JsonParser

            parser = _JsonParser()
            for lineno, raw in enumerate(self.payload.split(b"\n"), start=self.start):
                item = parse_jsonl_line(raw, lineno, self.name, parser)
                if item is not None:
                    yield item
        else:  # pragma: no cover
            raise ValueError(self.kind)


@dataclass
class ChunkResult:
    """The cleaned pairs of one chunk and its bookkeeping (see the module docstring)."""

    batch: pa.RecordBatch | None = None
    pair_key: np.ndarray | None = None
    prompt_key: np.ndarray | None = None
    multi_turn: np.ndarray | None = None
    with_system: np.ndarray | None = None
    with_scores: np.ndarray | None = None
    read: int = 0
    pairs_added_by_binarize: int = 0
    dropped: Counter = field(default_factory=Counter)
    binarize: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    error: DataError | None = None

    @property
    def kept(self) -> int:
        return 0 if self.batch is None else self.batch.num_rows


def process_chunk(ctx: ChunkContext, chunk: Chunk, rng: random.Random | None = None) -> ChunkResult:
    """Normalize, check and clean one chunk (runs in a worker or in the calling process).

    Row-level :class:`DataError` s are counted under their reason (``on_error: skip``) or
    end the chunk with ``result.error`` set (``raise``); fatal ones are raised.
    :class:`DropRow` and failed cleaning are counted under their reason.

    Args:
        rng: the file's binarization generator (required for ``best_vs_random``; a fresh
            unseeded one is never used for it).
    """
    res = ChunkResult()
    if ctx.fmt == "synthetic":
        normalize = normalize_synthetic
    else:
        assert ctx.cmap is not None and ctx.src is not None
        normalize = Normalizer(ctx.fmt, ctx.cmap, ctx.src, rng or random.Random(0), res.binarize, layout=ctx.layout)
    rows: list[dict[str, Any]] = []
    pkeys: list[bytes] = []
    gkeys: list[bytes] = []
    flags: list[tuple[bool, bool, bool]] = []
    for ref, rec in chunk.records():
        res.read += 1
        try:
            if isinstance(rec, DataError):
                raise rec
            out = normalize(rec, ref)
        except DataError as e:
            if e.fatal:
                raise
            if ctx.on_error == "raise":
                res.error = e
                break
            res.dropped[e.reason] += 1
            ex = res.examples.setdefault(e.reason, [])
            if len(ex) < MAX_ERROR_EXAMPLES:
                ex.append(str(e))
            continue
        except DropRow as d:
            res.dropped[d.reason] += 1
            continue
        res.pairs_added_by_binarize += len(out) - 1
        for row in out:
            reason = clean_reason(row, ctx.min_margin)
            if reason is not None:
                res.dropped[reason] += 1
                continue
            row["source"] = row.get("source") or ctx.label
            row["origin"] = ref.origin
            rows.append(row)
            pk, gk = pair_keys(row)
            pkeys.append(pk)
            gkeys.append(gk)
            p = row["prompt"]
            flags.append(
                (
                    sum(m["role"] == "user" for m in p) > 1,
                    p[0]["role"] == "system",
                    row["score_chosen"] is not None and row["score_rejected"] is not None,
                )
            )
    if rows:
        table = pa.Table.from_pylist([{c: r.get(c) for c in PAIR_SCHEMA.names} for r in rows], schema=PAIR_SCHEMA)
        res.batch = table.combine_chunks().to_batches()[0]
        res.pair_key = np.array(pkeys, dtype=KEY_DTYPE)
        res.prompt_key = np.array(gkeys, dtype=KEY_DTYPE)
        f = np.array(flags, dtype=bool).reshape(-1, 3)
        res.multi_turn, res.with_system, res.with_scores = f[:, 0].copy(), f[:, 1].copy(), f[:, 2].copy()
    return res


# --------------------------------------------------------------------------- chunking
def jsonl_chunks(path: Path, name: str, chunk_bytes: int | None = None) -> Iterator[Chunk]:
    """Raw chunks of whole lines of a JSON Lines file (``.gz`` decompressed), with line numbers.

    Raises:
        DataError: ``unreadable`` for I/O or gzip errors.
    """
    import gzip

    from orpo_core.data.errors import UNREADABLE
    from orpo_core.data.loading import _open_bytes

    chunk_bytes = chunk_bytes or CHUNK_BYTES
    line = 1
    rest = b""
    try:
        with _open_bytes(path) as f:
            while True:
                block = f.read(chunk_bytes)
                if not block:
                    break
                data = rest + block
                cut = data.rfind(b"\n")
                if cut < 0:
                    rest = data
                    continue
                payload, rest = data[:cut], data[cut + 1 :]
                yield Chunk("jsonl", payload, name, line)
                line += payload.count(b"\n") + 1
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read file: {e}", file=name, reason=UNREADABLE, fatal=True) from None
    if rest:
        yield Chunk("jsonl", rest, name, line)


def parquet_chunks(path: Path, name: str, rows: int | None = None) -> Iterator[Chunk]:
    """Record batches of a Parquet file (0-based row indices)."""
    import pyarrow.parquet as pq

    rows = rows or CHUNK_ROWS
    start = 0
    for batch in pq.ParquetFile(str(path)).iter_batches(batch_size=rows):
        yield Chunk("arrow", batch, name, start)
        start += batch.num_rows


def record_chunks(records: Iterator[Record], name: str, rows: int | None = None) -> Iterator[Chunk]:
    """Lists of ``rows`` records."""
    rows = rows or CHUNK_ROWS
    buf: list[Record] = []
    for item in records:
        buf.append(item)
        if len(buf) >= rows:
            yield Chunk("records", buf, name)
            buf = []
    if buf:
        yield Chunk("records", buf, name)


# --------------------------------------------------------------------------- running
class ChunkRunner:
    """Runs :func:`process_chunk` over the chunks of each file, in order.

    With ``num_proc > 1`` a pool of spawned processes is started on the first file that
    has more than one chunk and kept for the following files; :meth:`close` stops it.
    """

    def __init__(self, num_proc: int = 1) -> None:
        self.num_proc = max(1, int(num_proc))
        self._pool: ProcessPoolExecutor | None = None

    def run(self, ctx: ChunkContext, chunks: Iterator[Chunk], rng: random.Random | None = None) -> Iterator[ChunkResult]:
        """Yield the result of every chunk, in order."""
        chunks = iter(chunks)
        first = next(chunks, None)
        if first is None:
            return
        second = next(chunks, None)
        if second is None or self.num_proc == 1 or ctx.needs_shared_rng:
            for c in _prepend(first, second, chunks):
                yield process_chunk(ctx, c, rng)
            return
        pool = self._ensure_pool()
        window: deque[Future] = deque()
        try:
            for c in _prepend(first, second, chunks):
                window.append(pool.submit(process_chunk, ctx, c))
                if len(window) >= 2 * self.num_proc:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for f in window:
                f.cancel()

    def _ensure_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            import multiprocessing as mp

            self._pool = ProcessPoolExecutor(max_workers=self.num_proc, mp_context=mp.get_context("spawn"))
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "ChunkRunner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _prepend(first: Chunk, second: Chunk | None, rest: Iterator[Chunk]) -> Iterator[Chunk]:
    yield first
    if second is not None:
        yield second
        yield from rest

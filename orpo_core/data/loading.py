"""Reading raw records from a source: Hub datasets, local files and folders.

A *record* is one raw row (a dict) with its :class:`~orpo_core.data.errors.RowRef`.
Local files are read here rather than through ``datasets`` so that errors can
name the line:

* ``.jsonl`` / ``.jsonl.gz`` (also ``.ndjson``): read line by line; each line is
  decoded as UTF-8 and parsed on its own, so a bad line is a row-level error
  (``malformed_json`` / ``not_utf8``) that ``on_error: skip`` can skip.
* ``.json`` (``.json.gz``): a top-level array of objects, an object holding one
  array (``{"data": [...]}``), or JSON Lines saved as ``.json``.
* ``.csv`` (``.csv.gz``): pandas, every cell read as a string (empty cell -> "").
* ``.parquet``: pyarrow, nested lists/structs become Python lists/dicts.
* a folder: every supported file in it (recursively, sorted); when some file
  names start with the split name (``train.jsonl``, ``train-00000-of-00001.parquet``)
  only those are used for that split.
* anything else that is not an existing path is taken as a Hub dataset id and
  loaded with ``datasets.load_dataset(path, name, split=, revision=, data_files=)``
  (not exercised offline).
"""

from __future__ import annotations

import gzip
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from orpo_core.config import SourceConfig
from orpo_core.data.errors import (
    BAD_CONFIG,
    EMPTY_FILE,
    MALFORMED_JSON,
    NOT_UTF8,
    UNREADABLE,
    DataError,
    RowRef,
)

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")
JSON_SUFFIXES = (".json", ".json.gz")
CSV_SUFFIXES = (".csv", ".csv.gz")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = JSONL_SUFFIXES + JSON_SUFFIXES + CSV_SUFFIXES + PARQUET_SUFFIXES

Record = tuple[RowRef, Any]  # the raw value is normally a dict; readers yield DataError for bad rows


@dataclass
class RawSource:
    """The records of one split of one source.

    Attributes:
        name: file path(s) or ``"<hub id>[<split>]"`` (for messages and stats).
        records: iterator of ``(RowRef, dict)`` or ``(RowRef, DataError)`` for
            row-level read errors (bad JSON line, invalid UTF-8), which the caller
            raises or skips.
        columns: the column names (Parquet/CSV/Hub schema), or None for JSON
            where columns are inferred from the first records.
        files: the local files read (empty for Hub/synthetic).
    """

    name: str
    records: Iterator[Record]
    columns: list[str] | None = None
    files: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- helpers
def _has_suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in suffixes)


def _stem(path: Path) -> str:
    name = path.name
    for s in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(s):
            return name[: -len(s)]
    return path.stem


def _open_bytes(path: Path) -> io.BufferedIOBase:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _read_all_bytes(path: Path) -> bytes:
    try:
        with _open_bytes(path) as f:
            return f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read file: {e}", file=str(path), reason=UNREADABLE, fatal=True) from None


def _field_near(text: str, pos: int) -> str | None:
    """The last JSON object key that starts before ``pos`` (best effort, for messages)."""
    keys = re.findall(r'"((?:[^"\\]|\\.)*)"\s*:', text[:pos])
    return keys[-1] if keys else None


def _bad_utf8_field(raw: bytes) -> str | None:
    """Which field of a JSON line holds the invalid bytes (best effort)."""
    text = raw.decode("utf-8", errors="replace")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return _field_near(text, text.find("\ufffd"))

    def walk(v: Any, path: str) -> str | None:
        if isinstance(v, str):
            return path if "\ufffd" in v else None
        if isinstance(v, dict):
            for k, x in v.items():
                sub = f"{path}.{k}" if path else str(k)
                hit = walk(x, sub) or (sub if "\ufffd" in str(k) else None)
                if hit:
                    return hit
        if isinstance(v, list):
            for i, x in enumerate(v):
                hit = walk(x, f"{path}[{i}]")
                if hit:
                    return hit
        return None

    return walk(obj, "")


def _utf8_error(path: Path, data: bytes, err: UnicodeDecodeError) -> DataError:
    line = data.count(b"\n", 0, err.start) + 1
    return DataError(
        f"not valid UTF-8 (byte {data[err.start : err.start + 1]!r} at offset {err.start}); "
        "re-encode the file as UTF-8",
        ref=RowRef(str(path), line, "line"),
        reason=NOT_UTF8,
        fatal=True,
    )


# --------------------------------------------------------------------------- readers
def iter_jsonl(path: Path) -> Iterator[Record]:
    """Yield ``(RowRef(line), dict | DataError)`` for each non-blank line (1-based line numbers).

    Bad lines (invalid UTF-8, invalid JSON, not an object) are yielded as
    :class:`DataError` so the caller can raise or skip them.

    Raises:
        DataError: ``empty_file`` when no non-blank line exists; ``unreadable`` for I/O or gzip errors.
    """
    name = str(path)
    seen = False
    try:
        with _open_bytes(path) as f:
            for lineno, raw in enumerate(f, start=1):
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                if not raw.strip():
                    continue
                seen = True
                ref = RowRef(name, lineno, "line")
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield (
                        ref,
                        DataError(
                            f"not valid UTF-8 (byte {raw[e.start : e.start + 1]!r} at column {e.start + 1})",
                            ref=ref,
                            field=_bad_utf8_field(raw),
                            reason=NOT_UTF8,
                        ),
                    )
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    near = _field_near(text, e.pos)
                    yield (
                        ref,
                        DataError(
                            f"malformed JSON: {e.msg} at column {e.colno}" + (f" (after key {near!r})" if near else ""),
                            ref=ref,
                            field=near,
                            reason=MALFORMED_JSON,
                        ),
                    )
                    continue
                if not isinstance(obj, dict):
                    yield (
                        ref,
                        DataError(
                            f"expected a JSON object per line, got {type(obj).__name__}", ref=ref, reason=MALFORMED_JSON
                        ),
                    )
                    continue
                yield ref, obj
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read file: {e}", file=name, reason=UNREADABLE, fatal=True) from None
    if not seen:
        raise DataError("file is empty (no records)", file=name, reason=EMPTY_FILE, fatal=True)


def iter_json(path: Path) -> Iterator[Record]:
    """Records of a ``.json`` file: an array of objects, ``{"<key>": [objects]}`` or JSON Lines.

    Raises:
        DataError: ``not_utf8`` (fatal, names the line), ``malformed_json`` (fatal, names line
            and column), ``empty_file``.
    """
    name = str(path)
    data = _read_all_bytes(path)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if not data.strip():
        raise DataError("file is empty (no records)", file=name, reason=EMPTY_FILE, fatal=True)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _utf8_error(path, data, e) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines saved as .json
            yield from iter_jsonl(path)
            return
        near = _field_near(text, e.pos)
        raise DataError(
            f"malformed JSON: {e.msg} at column {e.colno}" + (f" (after key {near!r})" if near else ""),
            ref=RowRef(name, e.lineno, "line"),
            field=near,
            reason=MALFORMED_JSON,
            fatal=True,
        ) from None
    if isinstance(obj, dict):
        lists = [k for k, v in obj.items() if isinstance(v, list)]
        if len(lists) == 1:
            obj = obj[lists[0]]
        else:  # a single record
            obj = [obj]
    if not isinstance(obj, list):
        raise DataError(
            f"expected an array of objects, got {type(obj).__name__}", file=name, reason=MALFORMED_JSON, fatal=True
        )
    if not obj:
        raise DataError("file is empty (no records)", file=name, reason=EMPTY_FILE, fatal=True)
    for i, rec in enumerate(obj):
        ref = RowRef(name, i, "row")
        if not isinstance(rec, dict):
            yield ref, DataError(f"expected a JSON object, got {type(rec).__name__}", ref=ref, reason=MALFORMED_JSON)
        else:
            yield ref, rec


def csv_columns_and_rows(path: Path) -> tuple[list[str], Iterator[Record]]:
    """Read a CSV file with pandas, all cells as strings (empty cell -> "").

    Raises:
        DataError: ``not_utf8`` (fatal, names the line), ``unreadable``, ``empty_file``.
    """
    import pandas as pd

    name = str(path)
    data = _read_all_bytes(path)
    if not data.strip():
        raise DataError("file is empty (no records)", file=name, reason=EMPTY_FILE, fatal=True)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _utf8_error(path, data, e) from None
    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except Exception as e:  # pandas raises several parser error types
        raise DataError(f"cannot parse CSV: {e}", file=name, reason=UNREADABLE, fatal=True) from None
    if len(df) == 0:
        raise DataError("file is empty (header only, no records)", file=name, reason=EMPTY_FILE, fatal=True)
    cols = [str(c) for c in df.columns]

    def rows() -> Iterator[Record]:
        for i, rec in enumerate(df.to_dict(orient="records")):
            yield RowRef(name, i, "row"), rec

    return cols, rows()


def parquet_columns_and_rows(path: Path) -> tuple[list[str], Iterator[Record]]:
    """Read a Parquet file with pyarrow in record batches (0-based row indices).

    Raises:
        DataError: ``unreadable`` (not a Parquet file), ``empty_file`` (no rows).
    """
    import pyarrow.parquet as pq

    name = str(path)
    try:
        pf = pq.ParquetFile(str(path))
    except Exception as e:  # pyarrow.lib.ArrowInvalid and friends
        raise DataError(f"cannot read Parquet file: {e}", file=name, reason=UNREADABLE, fatal=True) from None
    if pf.metadata.num_rows == 0:
        raise DataError("file is empty (no rows)", file=name, reason=EMPTY_FILE, fatal=True)
    cols = list(pf.schema_arrow.names)

    def rows() -> Iterator[Record]:
        i = 0
        for batch in pf.iter_batches(batch_size=2048):
            for rec in batch.to_pylist():
                yield RowRef(name, i, "row"), rec
                i += 1

    return cols, rows()


def read_file(path: Path) -> tuple[list[str] | None, Iterator[Record]]:
    """Columns (None for JSON) and records of one local file, chosen by extension.

    Raises:
        DataError: ``bad_config`` for an unsupported extension, plus the readers' errors.
    """
    if _has_suffix(path, JSONL_SUFFIXES):
        return None, iter_jsonl(path)
    if _has_suffix(path, JSON_SUFFIXES):
        return None, iter_json(path)
    if _has_suffix(path, CSV_SUFFIXES):
        return csv_columns_and_rows(path)
    if _has_suffix(path, PARQUET_SUFFIXES):
        return parquet_columns_and_rows(path)
    raise DataError(
        f"unsupported file type (expected one of {', '.join(SUPPORTED_SUFFIXES)})",
        file=str(path),
        reason=BAD_CONFIG,
        fatal=True,
    )


def _chain_files(files: list[Path]) -> tuple[list[str] | None, Iterator[Record]]:
    """Read several files as one source; columns are the first file's (files are read lazily)."""
    first_cols, first_rows = read_file(files[0])

    def gen() -> Iterator[Record]:
        yield from first_rows
        for f in files[1:]:
            _, rows = read_file(f)
            yield from rows

    return first_cols, gen()


# --------------------------------------------------------------------------- sources
def looks_local(path: str) -> bool:
    """Whether ``path`` should be a local file/folder (exists, or has a path-like form)."""
    p = Path(path)
    if p.exists():
        return True
    if path.startswith((".", "/", "~")) or "\\" in path:
        return True
    if _has_suffix(p, SUPPORTED_SUFFIXES):
        return True
    # Hub ids are "name" or "namespace/name"; "data/prefs" with an existing "data/" is local
    if "/" in path and Path(path.split("/", 1)[0]).is_dir():
        return True
    return path.count("/") > 1


def folder_files(folder: Path, split: str | None, data_files: str | list[str] | None) -> list[Path]:
    """Supported files under ``folder`` for ``split``.

    With ``data_files`` (glob pattern(s) relative to the folder) only matching files
    are used. Otherwise, when some file names start with the split name
    (``train.jsonl``, ``train-00000-of-00001.parquet``, ``data/train_0.csv``) only
    those are returned; else all supported files.

    Raises:
        DataError: ``empty_file`` when the folder holds no supported file.
    """
    if data_files:
        patterns = [data_files] if isinstance(data_files, str) else list(data_files)
        found = sorted({p for pat in patterns for p in folder.glob(pat) if p.is_file()})
    else:
        found = sorted(p for p in folder.rglob("*") if p.is_file() and _has_suffix(p, SUPPORTED_SUFFIXES))
    found = [p for p in found if not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    if not found:
        raise DataError(
            f"no data files ({', '.join(SUPPORTED_SUFFIXES)}) in folder",
            file=str(folder),
            reason=EMPTY_FILE,
            fatal=True,
        )
    if split and not data_files:
        pat = re.compile(rf"^{re.escape(split)}(?:$|[-_.])", re.IGNORECASE)
        named = [p for p in found if pat.match(_stem(p))]
        if named:
            return named
    return found


def _local_test_files(src: SourceConfig, base: Path) -> list[Path]:
    """Files of a local source's ``test_split``: a path (absolute, or relative to the
    working directory or to the source's folder), or a split name inside a folder source."""
    ts = str(src.test_split)
    candidates = [Path(ts), (base if base.is_dir() else base.parent) / ts]
    for c in candidates:
        if c.is_file():
            return [c]
        if c.is_dir():
            return folder_files(c, None, None)
    if base.is_dir():
        pat = re.compile(rf"^{re.escape(ts)}(?:$|[-_.])", re.IGNORECASE)
        named = [p for p in folder_files(base, None, src.data_files) if pat.match(_stem(p))]
        if named:
            return named
    raise DataError(
        f"test_split {ts!r} is neither a file, a folder, nor a split-named file in the source folder",
        file=str(src.path),
        reason=BAD_CONFIG,
        fatal=True,
    )


def open_source(src: SourceConfig, which: str = "train", cache_dir: str | None = None) -> RawSource:
    """Open one split of a path source (``which``: ``"train"`` = ``src.split``, ``"test"`` = ``src.test_split``).

    Raises:
        DataError: fatal problems (missing file, empty file or folder, unreadable file).
    """
    assert src.path is not None
    path = src.path
    if looks_local(path):
        p = Path(path).expanduser()
        if not p.exists():
            raise DataError("file or folder not found", file=path, reason=BAD_CONFIG, fatal=True)
        if which == "test":
            files = _local_test_files(src, p)
        elif p.is_dir():
            files = folder_files(p, src.split, src.data_files)
        else:
            files = [p]
        cols, records = _chain_files(files)
        return RawSource(
            name=", ".join(str(f) for f in files), records=records, columns=cols, files=[str(f) for f in files]
        )
    split = src.split if which == "train" else str(src.test_split)
    return open_hub(src, split, cache_dir)


def open_hub(src: SourceConfig, split: str, cache_dir: str | None = None) -> RawSource:
    """Load a Hub dataset split with ``datasets.load_dataset`` (name, split, revision, data_files).

    Authentication uses the ambient ``HF_TOKEN`` / cached login; the token never
    appears in messages or stats.

    Raises:
        DataError: ``unreadable`` (fatal) when the dataset cannot be loaded.
    """
    import datasets

    name = f"{src.path}[{split}]"
    try:
        ds = datasets.load_dataset(
            src.path,
            src.name,
            split=split,
            revision=src.revision,
            data_files=src.data_files,
            cache_dir=cache_dir,
        )
    except Exception as e:  # network, missing split, auth: all fatal for this source
        raise DataError(
            f"cannot load Hub dataset (name={src.name!r}, split={split!r}, revision={src.revision!r}): "
            f"{type(e).__name__}: {e}",
            file=name,
            reason=UNREADABLE,
            fatal=True,
        ) from None
    if len(ds) == 0:
        raise DataError("dataset split is empty", file=name, reason=EMPTY_FILE, fatal=True)

    def rows() -> Iterator[Record]:
        for i, rec in enumerate(ds):
            yield RowRef(name, i, "row"), rec

    return RawSource(name=name, records=rows(), columns=list(ds.column_names))

"""Reading raw records from a source: Hub datasets, local files and folders.

A *record* is one raw row (a dict) with its :class:`~orpo_core.data.errors.RowRef`.
Local files are read here rather than through ``datasets`` so that errors can
name the line:

* ``.jsonl`` / ``.jsonl.gz`` (also ``.ndjson``): read line by line; each line is
  decoded as UTF-8 and parsed on its own, so a bad line is a row-level error
  (``malformed_json`` / ``not_utf8`` / ``duplicate_key``) that ``on_error: skip``
  can skip. A ``.jsonl`` file that holds one JSON array or object spanning lines
  is a fatal error with a hint (rename it to ``.json``), never a file whose
  lines are read one by one.
* ``.json`` (``.json.gz``): a top-level array of objects, an object holding one
  array (``{"data": [...]}``), or JSON Lines saved as ``.json``.
* ``.csv`` (``.csv.gz``): the ``csv`` module in strict mode, every cell read as a
  string (empty cell -> ""); an unterminated quote is fatal, a row whose number
  of fields differs from the header is a row-level ``malformed_csv`` error, both
  naming the line.
* ``.parquet``: pyarrow, nested lists/structs become Python lists/dicts.
* a folder: every supported file in it (recursively, sorted); when some file
  names start with the split name (``train.jsonl``, ``train-00000-of-00001.parquet``)
  only those are used for that split.
* anything else that is not an existing path is taken as a Hub dataset id and
  loaded with ``datasets.load_dataset(path, name, split=, revision=, data_files=)``
  (not exercised offline).

A JSON object with the same key twice (``{"chosen": "a", "chosen": "b"}``, where
a JSON parser silently keeps the last value) is a row-level ``duplicate_key``
error naming the key, at any nesting level.

Each file of a source is a :class:`RawFile` of its own (columns + records), so
the caller detects the format of every file separately.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from orpo_core.config import SourceConfig
from orpo_core.data.errors import (
    BAD_CONFIG,
    DUPLICATE_KEY,
    EMPTY_FILE,
    MALFORMED_CSV,
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
class RawFile:
    """The records of one file (or of one Hub dataset split).

    Attributes:
        name: the file path as given (or ``"<hub id>[<split>]"``).
        columns: the column names (Parquet/CSV/Hub schema), or None for JSON,
            where the caller infers them from the first records.
        records: iterator of ``(RowRef, dict)`` or ``(RowRef, DataError)`` for
            row-level read errors (bad JSON line, invalid UTF-8, duplicate key,
            CSV row with the wrong number of fields), which the caller raises or skips.
    """

    name: str
    columns: list[str] | None
    records: Iterator[Record]
    path: Path | None = None  # the local file, when there is one


@dataclass
class RawSource:
    """One split of one source: its files, each read and format-detected on its own.

    Attributes:
        name: file path(s) or ``"<hub id>[<split>]"`` (for messages and stats).
        parts: the files, opened lazily in order (a fatal error of a later file is
            raised when the iteration reaches it).
        files: the local files read (the Hub split name for Hub sources).
    """

    name: str
    parts: Iterator[RawFile]
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


def _read_text(path: Path) -> str:
    """The whole file (gzip-transparent) as UTF-8 text without a leading byte-order mark.

    Raises:
        DataError: unreadable (``unreadable``), empty or blank (``empty_file``), or not UTF-8
            (``bad_utf8``, with the line, column and field of the first bad byte); all fatal.
    """
    data = _read_all_bytes(path)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if not data.strip():
        raise DataError("file is empty (no records)", file=str(path), reason=EMPTY_FILE, fatal=True)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _utf8_error(path, data, e) from None


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

    return _find_string(obj, lambda s: "\ufffd" in s)


def _utf8_error(path: Path, data: bytes, err: UnicodeDecodeError) -> DataError:
    line = data.count(b"\n", 0, err.start) + 1
    return DataError(
        f"not valid UTF-8 (byte {data[err.start : err.start + 1]!r} at offset {err.start}); "
        "re-encode the file as UTF-8",
        ref=RowRef(str(path), line, "line"),
        reason=NOT_UTF8,
        fatal=True,
    )


# --------------------------------------------------------------------------- JSON parsing
_DUP = "\x00duplicate keys"  # marker key left by the parser hook in an object that had a key twice


class _JsonParser:
    """``json.loads`` that notices a key given twice in one object (json keeps the last).

    The hook costs one ``dict(pairs)`` per object; only when a duplicate was seen
    is the parsed value walked to name where (:meth:`duplicates`).
    """

    def __init__(self) -> None:
        self.found = False
        self._decoder = json.JSONDecoder(object_pairs_hook=self._hook)

    def _hook(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        d = dict(pairs)
        if len(d) != len(pairs):
            seen: set[str] = set()
            dups: list[str] = []
            for k, _ in pairs:
                if k in seen and k not in dups:
                    dups.append(k)
                seen.add(k)
            d[_DUP] = dups
            self.found = True
        return d

    def loads(self, text: str) -> Any:
        """Parse ``text``; raises :class:`json.JSONDecodeError` like ``json.loads``."""
        self.found = False
        return self._decoder.decode(text)

    @staticmethod
    def duplicates(obj: Any, path: str = "") -> list[str]:
        """Dotted paths of duplicated keys in ``obj`` (removing the markers)."""
        out: list[str] = []
        if isinstance(obj, dict):
            for k in obj.pop(_DUP, None) or []:
                out.append(f"{path}.{k}" if path else k)
            for k, v in obj.items():
                out += _JsonParser.duplicates(v, f"{path}.{k}" if path else str(k))
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                out += _JsonParser.duplicates(v, f"{path}[{i}]")
        return out


def _duplicate_key_error(dups: list[str], ref: RowRef) -> DataError:
    names = ", ".join(repr(d) for d in dups)
    return DataError(
        f"duplicate key{'s' if len(dups) > 1 else ''} {names} in one JSON object "
        "(a JSON parser keeps only the last value; remove or rename the other)",
        ref=ref,
        field=dups[0],
        reason=DUPLICATE_KEY,
    )


def _find_string(v: Any, bad: Callable[[str], bool], path: str = "") -> str | None:
    """The dotted path (``a.b[2]``) of the first string value or key in ``v`` for which ``bad``
    is true, or None. A bad top-level string gives ``<value>``."""
    if isinstance(v, str):
        return (path or "<value>") if bad(v) else None
    if isinstance(v, dict):
        for k, x in v.items():
            sub = f"{path}.{k}" if path else str(k)
            hit = _find_string(x, bad, sub) or (sub if bad(str(k)) else None)
            if hit:
                return hit
    elif isinstance(v, list):
        for i, x in enumerate(v):
            hit = _find_string(x, bad, f"{path}[{i}]")
            if hit:
                return hit
    return None


def _not_utf8_encodable(s: str) -> bool:
    """Whether ``s`` holds a lone UTF-16 surrogate (from a ``\\udXXX`` JSON escape)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _has_surrogate_escape(text: str) -> bool:
    """Whether JSON text has a ``\\udXXX`` escape (the only way to a lone surrogate)."""
    return "\\ud" in text or "\\uD" in text


def _surrogate_error(obj: Any, ref: RowRef) -> DataError | None:
    """A ``not_utf8`` error when ``obj`` holds a lone surrogate escape (not a character; it
    cannot be written as UTF-8), else None. Call only when :func:`_has_surrogate_escape`."""
    where = _find_string(obj, _not_utf8_encodable)
    if where is None:
        return None
    return DataError(
        "a \\uDXXX escape that is half of a UTF-16 surrogate pair, not a character (not valid UTF-8)",
        ref=ref,
        field=where,
        reason=NOT_UTF8,
    )


def _json_error(e: json.JSONDecodeError, text: str, ref: RowRef, fatal: bool = False) -> DataError:
    """A ``malformed_json`` error with the parser's own column (1-based characters) and the key before it."""
    near = _field_near(text, e.pos)
    return DataError(
        f"malformed JSON at column {e.colno}: {e.msg}" + (f" (after key {near!r})" if near else ""),
        ref=ref,
        field=near,
        reason=MALFORMED_JSON,
        fatal=fatal,
    )


_SPANNING_CHECK_BYTES = 256 << 20  # larger .jsonl files are not re-parsed whole to explain a bad first line


def _spanning_json(path: Path, first_line: str) -> str | None:
    """When a ``.jsonl`` file is really one JSON document (an array or object spanning
    lines, or an array on one line), say so; else None. Files over 256 MiB are not
    parsed whole: a first line that is only ``[`` or ``{`` is taken as the sign."""
    try:
        with _open_bytes(path) as f:
            data = f.read(_SPANNING_CHECK_BYTES + 1)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if len(data) > _SPANNING_CHECK_BYTES:
        if first_line.strip() in ("[", "{"):
            return (
                f"line 1 is {first_line.strip()!r}: the file looks like one JSON document spanning lines, "
                "not JSON Lines (one object per line): rename it to .json, or write one object per line"
            )
        return None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if isinstance(obj, list):
        what = f"one JSON array of {len(obj)} items"
    elif isinstance(obj, dict):
        what = "one JSON object"
    else:
        return None
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    span = f" spanning {lines} lines" if lines > 1 else " on one line"
    return (
        f"the file holds {what}{span}, not JSON Lines (one object per line): "
        "rename it to .json, or write one object per line"
    )


# --------------------------------------------------------------------------- readers
def parse_jsonl_line(raw: bytes, lineno: int, name: str, parser: "_JsonParser") -> Record | None:
    """One line of a JSON Lines file: None when blank, else ``(RowRef(line), dict | DataError)``.

    A UTF-8 BOM is dropped from line 1. Row-level errors (``not_utf8``, ``malformed_json``
    with the parser's column, ``duplicate_key``, a value that is not an object) are
    returned, not raised.
    """
    if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    if not raw.strip():
        return None
    ref = RowRef(name, lineno, "line")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return (
            ref,
            DataError(
                f"not valid UTF-8 (byte {raw[e.start : e.start + 1]!r} at column {e.start + 1})",
                ref=ref,
                field=_bad_utf8_field(raw),
                reason=NOT_UTF8,
            ),
        )
    try:
        obj = parser.loads(text)
    except json.JSONDecodeError as e:
        return ref, _json_error(e, text, ref)
    if not isinstance(obj, dict):
        return ref, DataError(
            f"expected a JSON object per line, got {type(obj).__name__}", ref=ref, reason=MALFORMED_JSON
        )
    if parser.found:
        return ref, _duplicate_key_error(parser.duplicates(obj), ref)
    return ref, (_has_surrogate_escape(text) and _surrogate_error(obj, ref)) or obj


def iter_jsonl(path: Path) -> Iterator[Record]:
    """Yield ``(RowRef(line), dict | DataError)`` for each non-blank line (1-based line numbers).

    Bad lines (invalid UTF-8, invalid JSON, not an object, a key given twice) are
    yielded as :class:`DataError` so the caller can raise or skip them
    (:func:`parse_jsonl_line`). JSON column numbers are the parser's (1-based, in
    characters of the line).

    Raises:
        DataError: ``empty_file`` when no non-blank line exists; ``unreadable`` for I/O or gzip errors;
            ``malformed_json`` (fatal) when the first record line does not parse (or is an array)
            because the whole file is one JSON array or object (a ``.json`` file saved as ``.jsonl``).
    """
    name = str(path)
    seen = False
    parser = _JsonParser()
    try:
        with _open_bytes(path) as f:
            for lineno, raw in enumerate(f, start=1):
                item = parse_jsonl_line(raw, lineno, name, parser)
                if item is None:
                    continue
                if not seen and isinstance(item[1], DataError) and item[1].reason == MALFORMED_JSON:
                    text = raw.decode("utf-8", errors="replace").lstrip("\ufeff")
                    if text.lstrip().startswith(("[", "{")):
                        hint = _spanning_json(path, text)
                        if hint:
                            raise DataError(hint, ref=item[0], reason=MALFORMED_JSON, fatal=True) from None
                seen = True
                yield item
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read file: {e}", file=name, reason=UNREADABLE, fatal=True) from None
    if not seen:
        raise DataError("file is empty (no records)", file=name, reason=EMPTY_FILE, fatal=True)


def iter_json(path: Path) -> Iterator[Record]:
    """Records of a ``.json`` file: an array of objects, ``{"<key>": [objects]}`` or JSON Lines.

    Raises:
        DataError: ``not_utf8`` (fatal, names the line), ``malformed_json`` (fatal, names line
            and column), ``empty_file``. A record with a key given twice is yielded as a
            row-level ``duplicate_key`` error.
    """
    name = str(path)
    text = _read_text(path)
    parser = _JsonParser()
    try:
        obj = parser.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines saved as .json
            yield from iter_jsonl(path)
            return
        # the column is the parser's, on the line it names
        line_start = text.rfind("\n", 0, e.pos) + 1
        line_end = text.find("\n", e.pos)
        line_text = text[line_start : line_end if line_end >= 0 else len(text)]
        err = json.JSONDecodeError(e.msg, line_text, e.pos - line_start)
        raise _json_error(err, line_text, RowRef(name, e.lineno, "line"), fatal=True) from None
    found = parser.found
    if isinstance(obj, dict):
        top_dups = obj.pop(_DUP, None) if found else None
        if top_dups:
            raise DataError(
                f"duplicate top-level key(s) {top_dups} (a JSON parser keeps only the last value)",
                file=name,
                field=top_dups[0],
                reason=DUPLICATE_KEY,
                fatal=True,
            )
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
    has_escape = _has_surrogate_escape(text)
    for i, rec in enumerate(obj):
        ref = RowRef(name, i, "row")
        if not isinstance(rec, dict):
            yield ref, DataError(f"expected a JSON object, got {type(rec).__name__}", ref=ref, reason=MALFORMED_JSON)
            continue
        dups = _JsonParser.duplicates(rec) if found else []
        if dups:
            yield ref, _duplicate_key_error(dups, ref)
        else:
            yield ref, (has_escape and _surrogate_error(rec, ref)) or rec


def csv_columns_and_rows(path: Path) -> tuple[list[str], Iterator[Record]]:
    """Read a CSV file with the ``csv`` module in strict mode, all cells as strings (empty cell -> "").

    Records are numbered by 0-based data row (``RowRef(unit="row")``); errors name the
    1-based line where the record starts (a quoted field may span lines). Blank lines
    are skipped; an empty header cell is named ``Unnamed: <i>`` (as pandas does).

    Raises:
        DataError: ``not_utf8`` (fatal, names the line), ``unreadable``, ``empty_file``,
            ``malformed_csv`` (fatal) for an unterminated quote or other quoting error, a
            duplicated header name, or a record with the wrong number of fields that spans
            several lines (a quote that closes too late). A one-line record with the wrong
            number of fields is yielded as a row-level ``malformed_csv`` error.
    """
    name = str(path)
    text = _read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)

    def parsed() -> Iterator[tuple[int, int, list[str]]]:
        """(first line, last line, fields) of each non-blank record."""
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                ref = RowRef(name, start, "line")
                if "end of data" in str(e):
                    msg = (
                        "malformed CSV: unterminated quoted field "
                        "(the quote opened in the record starting here runs to the end of the file)"
                    )
                else:
                    msg = f"malformed CSV: {e} (a quote inside a quoted field must be doubled: \"\")"
                raise DataError(msg, ref=ref, reason=MALFORMED_CSV, fatal=True) from None
            if not row or (len(row) == 1 and not row[0].strip() and reader.line_num == start):
                continue
            yield start, reader.line_num, row

    it = parsed()
    first = next(it, None)
    if first is None:
        raise DataError("file is empty (no records)", file=name, reason=EMPTY_FILE, fatal=True)
    header = [c if c != "" else f"Unnamed: {i}" for i, c in enumerate(first[2])]
    dup = [c for i, c in enumerate(header) if c in header[:i]]
    if dup:
        raise DataError(
            f"malformed CSV: column {dup[0]!r} appears twice in the header",
            ref=RowRef(name, first[0], "line"),
            field=dup[0],
            reason=MALFORMED_CSV,
            fatal=True,
        )
    second = next(it, None)
    if second is None:
        raise DataError("file is empty (header only, no records)", file=name, reason=EMPTY_FILE, fatal=True)

    def rows() -> Iterator[Record]:
        i = 0
        for start, end, row in _chain_one(second, it):
            ref = RowRef(name, i, "row")
            if len(row) != len(header):
                where = RowRef(name, start, "line")
                msg = f"malformed CSV: {len(row)} fields where the header has {len(header)} (row {i})"
                if end > start:
                    raise DataError(
                        msg + f"; the record runs from line {start} to line {end}: probably an unterminated quote",
                        ref=where,
                        reason=MALFORMED_CSV,
                        fatal=True,
                    )
                yield ref, DataError(msg, ref=where, reason=MALFORMED_CSV)
            else:
                yield ref, dict(zip(header, row))
            i += 1

    return header, rows()


def _chain_one(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


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


def read_part(path: Path) -> RawFile:
    """One local file as a :class:`RawFile`.

    Raises:
        DataError: as :func:`read_file`.
    """
    cols, records = read_file(path)
    return RawFile(str(path), cols, records, path)


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
        return RawSource(
            name=", ".join(str(f) for f in files),
            parts=(read_part(f) for f in files),
            files=[str(f) for f in files],
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

    return RawSource(name=name, parts=iter([RawFile(name, list(ds.column_names), rows())]), files=[name])

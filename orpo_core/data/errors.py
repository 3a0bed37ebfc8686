"""Errors and row references for the data stage.

Every problem found in input data is reported as a :class:`DataError` whose
message names the file (or Hub dataset and split), the row or line, and the
field, e.g.::

    data/prefs.jsonl: line 12: field 'chosen[0].role': unknown role 'bot' (expected one of ...)

Each error carries a ``reason`` code. Row-level reasons can be skipped with
``data.on_error: skip`` (the row is dropped and counted under its reason in
``stats.json``); whole-source problems (``fatal=True``: empty file, missing
column, unreadable file) always raise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Row-level reasons (skippable with data.on_error: skip)
MALFORMED_JSON = "malformed_json"
NOT_UTF8 = "not_utf8"
MISSING_FIELD = "missing_field"
UNKNOWN_ROLE = "unknown_role"
NON_STRING = "non_string"
BAD_CONVERSATION = "bad_conversation"
TOO_FEW_COMPLETIONS = "too_few_completions"
BAD_SCORE = "bad_score"
BAD_VALUE = "bad_value"
MALFORMED_CSV = "malformed_csv"  # a CSV row whose number of fields differs from the header
DUPLICATE_KEY = "duplicate_key"  # a JSON object with the same key twice
FOREIGN_KEYS = "foreign_keys"  # a row carrying the keys of another format than its file's
# Whole-source reasons (always fatal)
EMPTY_FILE = "empty_file"
MISSING_COLUMN = "missing_column"
UNREADABLE = "unreadable"
BAD_CONFIG = "bad_config"
NO_ROWS = "no_rows"


@dataclass(frozen=True)
class RowRef:
    """Where a record came from.

    Attributes:
        file: the local file path as given (or ``"<hub id>[<split>]"``, ``"synthetic:<task>"``).
        index: 1-based line number for JSON Lines files (``unit="line"``); 0-based
            row index for Parquet, CSV, JSON arrays, Hub datasets and synthetic rows
            (``unit="row"``), matching ``sed -n Np`` and ``df.iloc[N]`` / ``ds[N]``.
        unit: ``"line"`` or ``"row"``.
    """

    file: str
    index: int
    unit: Literal["line", "row"] = "row"

    @property
    def origin(self) -> str:
        """The ``origin`` column value: ``"<file or hub id>:<row or line number>"``."""
        return f"{self.file}:{self.index}"

    def __str__(self) -> str:
        return f"{self.file}: {self.unit} {self.index}"


class DataError(ValueError):
    """Bad input data. The message names file, row (or line) and field.

    Attributes:
        reason: a short code (``malformed_json``, ``missing_column``, ...), the key
            under which skipped rows are counted in ``stats.json``.
        file, row, field: the location (``row`` is ``"line 12"`` / ``"row 11"`` or None).
        fatal: True for whole-source problems that ``on_error: skip`` cannot skip.
    """

    def __init__(
        self,
        message: str,
        *,
        ref: RowRef | None = None,
        file: str | None = None,
        field: str | None = None,
        reason: str = BAD_VALUE,
        fatal: bool = False,
    ) -> None:
        self.detail = message
        self.file = ref.file if ref is not None else file
        self.row = f"{ref.unit} {ref.index}" if ref is not None else None
        self.field = field
        self.reason = reason
        self.fatal = fatal
        parts = [p for p in (self.file, self.row) if p]
        if field:
            parts.append(f"field '{field}'")
        parts.append(message)
        super().__init__(": ".join(parts))

    def __reduce__(self):  # keep every attribute across processes (worker -> parent)
        return (_rebuild_data_error, (str(self), self.detail, self.file, self.row, self.field, self.reason, self.fatal))

    def at(self, ref: RowRef) -> "DataError":
        """Return a copy located at ``ref`` (used when a helper raised without a location)."""
        return DataError(self.detail, ref=ref, field=self.field, reason=self.reason, fatal=self.fatal)


def _rebuild_data_error(
    message: str, detail: str, file: str | None, row: str | None, field: str | None, reason: str, fatal: bool
) -> DataError:
    err = DataError.__new__(DataError)
    ValueError.__init__(err, message)
    err.detail, err.file, err.row, err.field, err.reason, err.fatal = detail, file, row, field, reason, fatal
    return err


class DropRow(Exception):
    """Not an error: a well-formed row that yields no usable pair (a tie, chosen and
    rejected that do not share a prompt, ...). Counted in stats under ``reason``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def short(value: object, limit: int = 60) -> str:
    """``repr`` of a value cut to ``limit`` characters, for error messages."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."

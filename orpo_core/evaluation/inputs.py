"""Reading the held-out Parquet files that evaluation scores (one reader, one error style)."""

from __future__ import annotations

from pathlib import Path

from .errors import EvalInputError


def read_parquet_table(path: str | Path):
    """Read a held-out Parquet file as a ``pyarrow.Table``.

    Raises:
        EvalInputError: the file does not exist or pyarrow cannot read it (message names the path).
    """
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"held-out file {path} does not exist")
    try:
        return pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise EvalInputError(f"{path}: unreadable parquet ({e})") from None

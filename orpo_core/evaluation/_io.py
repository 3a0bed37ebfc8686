"""Atomic file writes (temp file in the same folder, then ``os.replace``)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` then rename ``tmp_path`` to ``path``.

    The temp file lives in the destination folder so the rename is atomic: ``path``
    is either the previous version or the complete new one, never half written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        writer(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def _json_safe(value: Any) -> Any:
    """Replace non-finite floats by None (strict JSON) and numpy scalars by Python numbers."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented, strict JSON (NaN/inf become null) atomically."""
    text = json.dumps(_json_safe(data), indent=2, sort_keys=False, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


def read_parquet_table(path: str | Path):
    """Read a held-out Parquet file as a ``pyarrow.Table``.

    Raises:
        EvalInputError: the file does not exist or pyarrow cannot read it (message names the path).
    """
    import pyarrow.parquet as pq

    from .errors import EvalInputError

    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"held-out file {path} does not exist")
    try:
        return pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise EvalInputError(f"{path}: unreadable parquet ({e})") from None

"""Small file and value helpers shared by every layer: atomic writes, JSON-safe values, hashes, numbers.

* :func:`atomic_write` (and its text / JSON forms): write to a temp file in the destination
  folder, then ``os.replace``: a reader sees the previous version or the complete new one,
  never a half-written file, also when the writer is killed.
* :func:`json_safe`: a strict-JSON copy of a value (non-finite floats become ``None``).
* :func:`file_sha256`: the sha256 of a file's bytes, streamed in 1 MiB blocks.
* :func:`round_sig` / :func:`fmt_value`: numbers for people (4 significant digits, integers
  without decimals).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20
SIG_DIGITS = 4


# --------------------------------------------------------------------------- atomic writes
def atomic_write(path: str | Path, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` then rename ``tmp_path`` to ``path``; returns ``path``.

    The temp file (``.<name>.<random>.tmp``) lives in the destination folder so the rename is
    atomic. On any error the temp file is removed and the error re-raised; ``path`` keeps its
    previous content.

    Raises:
        OSError: the folder cannot be created or written (from ``writer`` or the rename).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        writer(tmp_path)
        # mkstemp creates 0600 files: give the file the umask's normal mode (0644 under umask 022)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, data: Any, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Write ``data`` as strict JSON (:func:`json_safe`: NaN/inf become null) atomically."""
    text = json.dumps(json_safe(data), indent=indent, sort_keys=sort_keys, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


# --------------------------------------------------------------------------- values
def json_safe(obj: Any) -> Any:
    """A strict-JSON copy of ``obj``.

    Mappings (keys as str), lists and tuples are copied recursively; non-finite floats become
    ``None``; numpy / torch scalars become Python numbers and arrays / tensors lists
    (``.item()`` / ``.tolist()``); ``str``, ``int``, ``bool`` and ``None`` pass; anything else
    (paths, enums, ...) becomes ``str(obj)``.
    """
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if getattr(obj, "ndim", None) == 0 and callable(getattr(obj, "item", None)):
        with contextlib.suppress(Exception):
            return json_safe(obj.item())
    if callable(getattr(obj, "tolist", None)):
        with contextlib.suppress(Exception):
            return json_safe(obj.tolist())
    if callable(getattr(obj, "item", None)):
        with contextlib.suppress(Exception):
            return json_safe(obj.item())
    return str(obj)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks.

    Raises:
        FileNotFoundError: no such file.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def round_sig(x: float, digits: int = SIG_DIGITS) -> float:
    """``x`` rounded to ``digits`` significant digits (0 and non-finite values unchanged)."""
    if not math.isfinite(x) or x == 0:
        return x
    return float(f"{x:.{digits}g}")


def fmt_value(v: Any, digits: int = SIG_DIGITS) -> str:
    """A value for people: floats to ``digits`` significant digits (integral floats such as
    ``178.0`` as ``178``), ints with no decimals, None as ``-``."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v.is_integer() and abs(v) < 1e15:
            return str(int(v))
        return f"{v:.{digits}g}"
    return str(v)

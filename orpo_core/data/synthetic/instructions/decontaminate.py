"""13-gram decontamination against a benchmark's prompts (Google's IFEval by default).

A text is contaminated when it shares one word 13-gram with any benchmark prompt. Words are
the lower-cased runs of letters and digits (``[a-z0-9]+``), so punctuation, case and
spacing do not hide an overlap. 13-grams are the overlap unit of the GPT-3 paper's
contamination study (Brown et al. 2020, appendix C) and of lm-eval's decontamination tool
(``lm_eval/decontamination``, which also uses 13-grams).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

__all__ = ["N", "NgramIndex", "benchmark_info", "words"]

N = 13
_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """The lower-cased word tokens of ``text`` (``[a-z0-9]+`` runs)."""
    return _WORD.findall(text.lower())


def _grams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


class NgramIndex:
    """The set of word n-grams of a list of texts.

    Args:
        texts: benchmark prompts.
        n: gram length in words (13).
    """

    def __init__(self, texts: list[str], n: int = N):
        self.n = n
        self.n_texts = len(texts)
        self._grams: set[tuple[str, ...]] = set()
        for t in texts:
            self._grams |= _grams(words(t), n)

    @classmethod
    def from_ifeval(cls, path: str | os.PathLike, n: int = N) -> "NgramIndex":
        """All prompts (both halves) of an IFEval input file (JSONL with a ``prompt`` field).

        Raises:
            FileNotFoundError: no such file.
            ValueError: a line that is not JSON or has no string ``prompt`` (names file and line).
        """
        texts = []
        p = Path(path)
        with p.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    prompt = json.loads(line)["prompt"]
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{p}: line {lineno}: not a JSON object with a 'prompt' field ({e})") from e
                if not isinstance(prompt, str):
                    raise ValueError(f"{p}: line {lineno}: field 'prompt' is not a string")
                texts.append(prompt)
        return cls(texts, n)

    def __len__(self) -> int:
        return len(self._grams)

    def shares_ngram(self, text: str) -> bool:
        """True when ``text`` has a word n-gram that some indexed text has."""
        return not self._grams.isdisjoint(_grams(words(text), self.n))


def benchmark_info(path: str | os.PathLike) -> dict[str, object]:
    """How stats.json names a decontamination benchmark: absolute ``path``, ``sha256`` of the file, ``ngram`` (13).

    Raises:
        FileNotFoundError: no such file.
    """
    from orpo_core.io import file_sha256

    p = Path(path).expanduser()
    return {"path": str(p.resolve()), "sha256": file_sha256(p), "ngram": N}

"""Verifiable instructions in the spirit of IFEval: one class per instruction id.

Each verifier is built from its id's keyword arguments, renders the sentence
that goes into the prompt (:attr:`Verifier.description`, IFEval's wording) and
checks a response with :meth:`Verifier.check`. The checks follow IFEval's
*strict* semantics (Zhou et al. 2023, "Instruction-Following Evaluation for
Large Language Models"; google-research ``instruction_following_eval`` and
lm-eval's ``lm_eval/tasks/ifeval/instructions.py``): they look at the raw
response, and an empty or whitespace-only response follows no instruction
(``test_instruction_following_strict``).

Differences from IFEval, on purpose:

* ``change_case:english_capital`` / ``english_lowercase`` drop IFEval's
  ``langdetect`` language check (every generated content is English, and
  ``langdetect`` is neither deterministic on short text nor a dependency);
  the case test (``str.isupper`` / ``str.islower``) is IFEval's.
* ``detectable_format:json_key`` is ours (not an IFEval id): a JSON object
  (markdown fences allowed, as in ``json_format``) with a given top-level key.
  :data:`IFEVAL_IDS` lists the ids whose semantics are IFEval's.

Nothing here imports lm-eval or NLTK: IFEval's word count (NLTK's
``RegexpTokenizer(r"\\w+")``) is the same as ``re.findall(r"\\w+", text)``.
"""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar

__all__ = [
    "IFEVAL_IDS",
    "REGISTRY",
    "ConstraintError",
    "Verifier",
    "build",
    "check_all",
    "count_words",
    "from_json",
    "to_json",
]


class ConstraintError(ValueError):
    """An unknown instruction id, or missing / unexpected / badly typed keyword arguments."""


def count_words(text: str) -> int:
    """Number of ``\\w+`` tokens (IFEval's ``instructions_util.count_words``)."""
    return len(re.findall(r"\w+", text))


def _strip_json_fence(value: str) -> str:
    """IFEval ``JsonFormat``: strip, then drop a leading ```json / ``` fence and a trailing ```."""
    return (
        value.strip()
        .removeprefix("```json")
        .removeprefix("```Json")
        .removeprefix("```JSON")
        .removeprefix("```")
        .removesuffix("```")
        .strip()
    )


class Verifier:
    """Base class: an instruction id, its keyword arguments, a description and a check.

    Subclasses set :attr:`id`, :attr:`kwarg_types` (name -> accepted Python type(s); all
    required; an ``int`` must be >= 1, a ``str`` non-blank and is stored stripped, a ``list``
    a non-empty list of non-blank strings) and :attr:`template` (or override :meth:`_describe`),
    and implement :meth:`_follows`.

    Raises:
        ConstraintError: missing, unexpected or badly typed keyword arguments,
            or a value outside the allowed range (see each subclass).
    """

    id: ClassVar[str] = ""
    kwarg_types: ClassVar[dict[str, type | tuple[type, ...]]] = {}
    #: the instruction's wording, ``str.format`` placeholders named after the keyword arguments
    template: ClassVar[str] = ""

    def __init__(self, **kwargs: Any) -> None:
        missing = sorted(set(self.kwarg_types) - set(kwargs))
        extra = sorted(set(kwargs) - set(self.kwarg_types))
        if missing or extra:
            raise ConstraintError(
                f"{self.id}: expects keyword arguments {sorted(self.kwarg_types)}"
                + (f", missing {missing}" if missing else "")
                + (f", unexpected {extra}" if extra else "")
            )
        for name, typ in self.kwarg_types.items():
            value = kwargs[name]
            if isinstance(value, bool) or not isinstance(value, typ):
                raise ConstraintError(f"{self.id}: {name} must be {typ}, got {value!r}")
        self.kwargs: dict[str, Any] = dict(kwargs)
        for name, value in kwargs.items():
            if isinstance(value, int):
                _positive(self, name)
            elif isinstance(value, str):
                _nonempty(self, name)
                self.kwargs[name] = value.strip()
            elif isinstance(value, list) and not (value and all(isinstance(w, str) and w.strip() for w in value)):
                raise ConstraintError(f"{self.id}: {name} must be a non-empty list of non-empty strings, got {value!r}")
        self._validate()

    def _validate(self) -> None:
        """Further checks of the keyword arguments (override)."""

    @property
    def description(self) -> str:
        """The instruction as written into the prompt (IFEval's wording where the id is IFEval's)."""
        return self._describe()

    def _describe(self) -> str:
        """:attr:`template` filled with the keyword arguments; subclasses with wording that
        depends on the values override this."""
        return self.template.format(**self.kwargs)

    def _follows(self, response: str) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def check(self, response: str) -> bool:
        """True when ``response`` follows the instruction (IFEval strict: raw text, empty fails)."""
        if not isinstance(response, str):
            raise TypeError(f"{self.id}: response must be str, got {type(response).__name__}")
        return bool(response.strip()) and bool(self._follows(response))

    def to_dict(self) -> dict[str, Any]:
        """``{"id": ..., "kwargs": {...}}`` (the form stored in the ``constraints`` column)."""
        return {"id": self.id, "kwargs": dict(self.kwargs)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.id!r}, {self.kwargs!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Verifier) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))


def _positive(v: Verifier, name: str, lo: int = 1) -> None:
    if v.kwargs[name] < lo:
        raise ConstraintError(f"{v.id}: {name} must be >= {lo}, got {v.kwargs[name]}")


def _nonempty(v: Verifier, name: str) -> None:
    if not str(v.kwargs[name]).strip():
        raise ConstraintError(f"{v.id}: {name} must not be empty")


# --------------------------------------------------------------------------- change_case
class EnglishCapital(Verifier):
    """The entire response in capital letters (``str.isupper``: has a cased letter, none lowercase)."""

    id = "change_case:english_capital"

    template = "Your entire response should be in English, and in all capital letters."

    def _follows(self, response: str) -> bool:
        return response.isupper()


class EnglishLowercase(Verifier):
    """The entire response in lowercase letters (``str.islower``: has a cased letter, none uppercase)."""

    id = "change_case:english_lowercase"

    template = "Your entire response should be in English, and in all lowercase letters. No capital letters are allowed."

    def _follows(self, response: str) -> bool:
        return response.islower()


# --------------------------------------------------------------------------- detectable_format
class NumberBulletLists(Verifier):
    """Exactly ``num_bullets`` markdown bullets: lines ``^\\s*\\*[^*]`` plus lines ``^\\s*-`` (IFEval)."""

    id = "detectable_format:number_bullet_lists"
    kwarg_types = {"num_bullets": int}

    template = (
        "Your answer must contain exactly {num_bullets} bullet points. "
        "Use the markdown bullet points such as:\n* This is point 1. \n* This is point 2"
    )

    def _follows(self, response: str) -> bool:
        stars = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
        dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
        return len(stars) + len(dashes) == self.kwargs["num_bullets"]


class JsonFormat(Verifier):
    """The whole response parses as JSON (after stripping a markdown ```json fence, as IFEval)."""

    id = "detectable_format:json_format"

    template = "Entire output should be wrapped in JSON format. You can use markdown ticks such as ```."

    def _follows(self, response: str) -> bool:
        try:
            json.loads(_strip_json_fence(response))
        except ValueError:
            return False
        return True


class JsonKey(Verifier):
    """Ours, not IFEval: the whole response is a JSON object (fence allowed) with top-level ``key``."""

    id = "detectable_format:json_key"
    kwarg_types = {"key": str}

    template = 'Entire output should be a JSON object with the key "{key}". You can use markdown ticks such as ```.'

    def _follows(self, response: str) -> bool:
        try:
            obj = json.loads(_strip_json_fence(response))
        except ValueError:
            return False
        return isinstance(obj, dict) and self.kwargs["key"] in obj


class Title(Verifier):
    """A title in double angular brackets, ``<<...>>`` on one line with non-blank text (IFEval)."""

    id = "detectable_format:title"

    template = "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>."

    def _follows(self, response: str) -> bool:
        titles = re.findall(r"<<[^\n]+>>", response)
        return any(t.lstrip("<").rstrip(">").strip() for t in titles)


# --------------------------------------------------------------------------- startend
class EndChecker(Verifier):
    """Ends with ``end_phrase`` (case-insensitive, after stripping whitespace and double quotes; IFEval)."""

    id = "startend:end_checker"
    kwarg_types = {"end_phrase": str}

    template = "Finish your response with this exact phrase {end_phrase}. No other words should follow this phrase."

    def _follows(self, response: str) -> bool:
        return response.strip().strip('"').lower().endswith(self.kwargs["end_phrase"].lower())


class Quotation(Verifier):
    """The stripped response starts and ends with a double quote and is longer than one character (IFEval)."""

    id = "startend:quotation"

    template = "Wrap your entire response with double quotation marks."

    def _follows(self, response: str) -> bool:
        value = response.strip()
        return len(value) > 1 and value[0] == '"' and value[-1] == '"'


# --------------------------------------------------------------------------- punctuation / length
class NoComma(Verifier):
    """No ``,`` anywhere in the response (IFEval)."""

    id = "punctuation:no_comma"

    template = "In your entire response, refrain from the use of any commas."

    def _follows(self, response: str) -> bool:
        return "," not in response


class NumberWords(Verifier):
    """``count_words(response) < num_words`` (``relation="less than"``) or ``>=`` (``"at least"``), IFEval."""

    id = "length_constraints:number_words"
    kwarg_types = {"num_words": int, "relation": str}
    RELATIONS = ("less than", "at least")

    def _validate(self) -> None:
        if self.kwargs["relation"] not in self.RELATIONS:
            raise ConstraintError(f"{self.id}: relation must be one of {self.RELATIONS}, got {self.kwargs['relation']!r}")

    template = "Answer with {relation} {num_words} words."

    def _follows(self, response: str) -> bool:
        n = count_words(response)
        return n < self.kwargs["num_words"] if self.kwargs["relation"] == "less than" else n >= self.kwargs["num_words"]


class NumberParagraphs(Verifier):
    """Exactly ``num_paragraphs`` paragraphs separated by ``***`` (IFEval: split on ``\\s?\\*\\*\\*\\s?``;
    an empty first/last piece is not counted, an empty middle one fails)."""

    id = "length_constraints:number_paragraphs"
    kwarg_types = {"num_paragraphs": int}

    template = "There should be {num_paragraphs} paragraphs. Paragraphs are separated with the markdown divider: ***"

    def _follows(self, response: str) -> bool:
        paragraphs = re.split(r"\s?\*\*\*\s?", response)
        n = len(paragraphs)
        for i, p in enumerate(paragraphs):
            if not p.strip():
                if i == 0 or i == len(paragraphs) - 1:
                    n -= 1
                else:
                    return False
        return n == self.kwargs["num_paragraphs"]


# --------------------------------------------------------------------------- content / keywords
class Postscript(Verifier):
    """A postscript starting with ``postscript_marker`` (IFEval: ``P.S.`` / ``P.P.S`` patterns, case-insensitive)."""

    id = "detectable_content:postscript"
    kwarg_types = {"postscript_marker": str}

    template = "At the end of your response, please explicitly add a postscript starting with {postscript_marker}"

    def _follows(self, response: str) -> bool:
        marker = self.kwargs["postscript_marker"]
        value = response.lower()
        if marker == "P.P.S":
            pattern = r"\s*p\.\s?p\.\s?s.*$"
        elif marker == "P.S.":
            pattern = r"\s*p\.\s?s\..*$"
        else:
            pattern = r"\s*" + marker.lower() + r".*$"
        return bool(re.findall(pattern, value, flags=re.MULTILINE))


class KeywordsExistence(Verifier):
    """Every keyword occurs (``re.search``, case-insensitive; a keyword is a regex as in IFEval)."""

    id = "keywords:existence"
    kwarg_types = {"keywords": list}

    def _validate(self) -> None:
        self.kwargs["keywords"] = sorted(self.kwargs["keywords"])

    template = "Include keywords {keywords} in the response."

    def _follows(self, response: str) -> bool:
        return all(re.search(k, response, flags=re.IGNORECASE) for k in self.kwargs["keywords"])


class ForbiddenWords(Verifier):
    """None of ``forbidden_words`` occurs as a whole word (``\\bword\\b``, case-insensitive; IFEval)."""

    id = "keywords:forbidden_words"
    kwarg_types = {"forbidden_words": list}

    def _validate(self) -> None:
        self.kwargs["forbidden_words"] = sorted(set(self.kwargs["forbidden_words"]))

    template = "Do not include keywords {forbidden_words} in the response."

    def _follows(self, response: str) -> bool:
        return not any(re.search(r"\b" + w + r"\b", response, flags=re.IGNORECASE) for w in self.kwargs["forbidden_words"])


#: id -> verifier class
REGISTRY: dict[str, type[Verifier]] = {
    cls.id: cls
    for cls in (
        EnglishCapital,
        EnglishLowercase,
        NumberBulletLists,
        JsonFormat,
        JsonKey,
        Title,
        EndChecker,
        Quotation,
        NoComma,
        NumberWords,
        NumberParagraphs,
        Postscript,
        KeywordsExistence,
        ForbiddenWords,
    )
}

#: ids whose checks are IFEval's (``json_key`` is ours; the two case checks skip the language test)
IFEVAL_IDS = frozenset(REGISTRY) - {JsonKey.id}


def build(instruction_id: str, kwargs: dict[str, Any] | None = None) -> Verifier:
    """The verifier for ``instruction_id`` with ``kwargs``.

    IFEval rows list ``None`` for unused keyword arguments; like lm-eval's
    ``test_instruction_following_strict``, ``None`` values are dropped.

    Raises:
        ConstraintError: unknown id or bad keyword arguments.
    """
    cls = REGISTRY.get(instruction_id)
    if cls is None:
        raise ConstraintError(f"unknown instruction id {instruction_id!r} (known: {sorted(REGISTRY)})")
    return cls(**{k: v for k, v in (kwargs or {}).items() if v is not None})


def to_json(verifiers: list[Verifier]) -> str:
    """Serialize constraints for the ``constraints`` column: ``[{"id": ..., "kwargs": {...}}, ...]``."""
    return json.dumps([v.to_dict() for v in verifiers], sort_keys=True, ensure_ascii=False)


def from_json(text: str | list[dict[str, Any]]) -> list[Verifier]:
    """Parse a ``constraints`` value (JSON string or already-parsed list) into verifiers.

    Raises:
        ConstraintError: not JSON, not a list of ``{"id", "kwargs"}`` objects, or bad constraints.
    """
    if isinstance(text, str):
        try:
            items = json.loads(text)
        except ValueError as e:
            raise ConstraintError(f"constraints are not valid JSON ({e})") from None
    else:
        items = text
    if not isinstance(items, list) or not all(isinstance(i, dict) and "id" in i for i in items):
        raise ConstraintError(f"constraints must be a list of {{'id', 'kwargs'}} objects, got {str(items)[:200]}")
    return [build(i["id"], i.get("kwargs")) for i in items]


def check_all(response: str, verifiers: list[Verifier]) -> list[bool]:
    """One strict pass/fail per verifier (IFEval instruction level); ``all(...)`` is the prompt level."""
    return [v.check(response) for v in verifiers]

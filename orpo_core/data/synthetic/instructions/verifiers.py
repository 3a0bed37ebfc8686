"""Verifiable instructions in the spirit of IFEval: one class per instruction id.

Each verifier is built from its id's keyword arguments (validated here, so a bad
constraint fails with :class:`ConstraintError` naming the id and argument), renders the
sentence that goes into the prompt (:attr:`Verifier.description`) and checks a response
with :meth:`Verifier.check`. For Google's IFEval ids, wording and check are lm-eval's own
checker (``lm_eval/tasks/ifeval/instructions.py``, a copy of google-research
``instruction_following_eval``, through :mod:`orpo_core.data.synthetic.instructions.checks`):
``build_description(**kwargs)`` and ``check_following(response)`` with IFEval's *strict*
semantics (the raw response; an empty or whitespace-only response follows no
instruction, lm-eval's ``test_instruction_following_strict``). That includes the
``langdetect`` English test of ``change_case:english_capital`` / ``english_lowercase``
(seeded, so verdicts repeat: :func:`~orpo_core.data.synthetic.instructions.checks.registry`).

Only ``detectable_format:json_key`` is ours (IFEval has no equivalent): a JSON object
(markdown fences allowed, as in ``json_format``) with a given top-level key.
:data:`IFEVAL_IDS` lists the ids checked by lm-eval.
"""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar

from orpo_core.data.synthetic.instructions import checks

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

    Subclasses set :attr:`id` and :attr:`kwarg_types` (name -> accepted Python type(s); all
    required; an ``int`` must be >= 1, a ``str`` non-blank and is stored stripped, a ``list``
    a non-empty list of non-blank strings). For an IFEval id (:attr:`ifeval` true) wording
    and check are lm-eval's checker built with these kwargs; a class of ours sets
    :attr:`ifeval` false and overrides :meth:`_describe` and :meth:`_follows`.

    Raises:
        ConstraintError: missing, unexpected or badly typed keyword arguments,
            or a value outside the allowed range (see each subclass).
    """

    id: ClassVar[str] = ""
    kwarg_types: ClassVar[dict[str, type | tuple[type, ...]]] = {}
    #: wording and check are lm-eval's IFEval checker for :attr:`id`
    ifeval: ClassVar[bool] = True

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
        """The instruction as written into the prompt (lm-eval's wording where the id is IFEval's)."""
        return self._describe()

    def _describe(self) -> str:
        """lm-eval's ``build_description(**kwargs)`` (classes of ours override this)."""
        return checks.describe(self.id, self.kwargs)

    def _follows(self, response: str) -> bool:
        """lm-eval's strict verdict (classes of ours override this)."""
        return checks.check(response, [self.id], [self.kwargs], prompt="")[0]

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


# --------------------------------------------------------------------------- IFEval's ids
# Wording and check are lm-eval's (the base class); these classes only state and validate
# each id's keyword arguments.
class EnglishCapital(Verifier):
    """The entire response in English capital letters (lm-eval: ``str.isupper`` and ``langdetect`` says English)."""

    id = "change_case:english_capital"


class EnglishLowercase(Verifier):
    """The entire response in English lowercase letters (lm-eval: ``str.islower`` and ``langdetect`` says English)."""

    id = "change_case:english_lowercase"


class NumberBulletLists(Verifier):
    """Exactly ``num_bullets`` markdown bullets: lines ``^\\s*\\*[^*]`` plus lines ``^\\s*-`` (IFEval)."""

    id = "detectable_format:number_bullet_lists"
    kwarg_types = {"num_bullets": int}


class JsonFormat(Verifier):
    """The whole response parses as JSON (after stripping a markdown ```json fence, as IFEval)."""

    id = "detectable_format:json_format"


class Title(Verifier):
    """A title in double angular brackets, ``<<...>>`` on one line with non-blank text (IFEval)."""

    id = "detectable_format:title"


class EndChecker(Verifier):
    """Ends with ``end_phrase`` (case-insensitive, after stripping whitespace and double quotes; IFEval)."""

    id = "startend:end_checker"
    kwarg_types = {"end_phrase": str}


class Quotation(Verifier):
    """The stripped response starts and ends with a double quote and is longer than one character (IFEval)."""

    id = "startend:quotation"


class NoComma(Verifier):
    """No ``,`` anywhere in the response (IFEval)."""

    id = "punctuation:no_comma"


class NumberWords(Verifier):
    """``count_words(response) < num_words`` (``relation="less than"``) or ``>=`` (``"at least"``), IFEval."""

    id = "length_constraints:number_words"
    kwarg_types = {"num_words": int, "relation": str}
    RELATIONS = ("less than", "at least")

    def _validate(self) -> None:
        if self.kwargs["relation"] not in self.RELATIONS:
            raise ConstraintError(f"{self.id}: relation must be one of {self.RELATIONS}, got {self.kwargs['relation']!r}")


class NumberParagraphs(Verifier):
    """Exactly ``num_paragraphs`` paragraphs separated by ``***`` (IFEval: split on ``\\s?\\*\\*\\*\\s?``;
    an empty first/last piece is not counted, an empty middle one fails)."""

    id = "length_constraints:number_paragraphs"
    kwarg_types = {"num_paragraphs": int}


class Postscript(Verifier):
    """A postscript starting with ``postscript_marker`` (IFEval: ``P.S.`` / ``P.P.S`` patterns, case-insensitive)."""

    id = "detectable_content:postscript"
    kwarg_types = {"postscript_marker": str}


class KeywordsExistence(Verifier):
    """Every keyword occurs (``re.search``, case-insensitive; a keyword is a regex as in IFEval)."""

    id = "keywords:existence"
    kwarg_types = {"keywords": list}

    def _validate(self) -> None:
        self.kwargs["keywords"] = sorted(self.kwargs["keywords"])


class ForbiddenWords(Verifier):
    """None of ``forbidden_words`` occurs as a whole word (``\\bword\\b``, case-insensitive; IFEval)."""

    id = "keywords:forbidden_words"
    kwarg_types = {"forbidden_words": list}

    def _validate(self) -> None:
        self.kwargs["forbidden_words"] = sorted(set(self.kwargs["forbidden_words"]))


# --------------------------------------------------------------------------- ours
class JsonKey(Verifier):
    """Ours, not IFEval: the whole response is a JSON object (fence allowed) with top-level ``key``."""

    id = "detectable_format:json_key"
    kwarg_types = {"key": str}
    ifeval = False

    def _describe(self) -> str:
        return f'Entire output should be a JSON object with the key "{self.kwargs["key"]}". You can use markdown ticks such as ```.'

    def _follows(self, response: str) -> bool:
        try:
            obj = json.loads(_strip_json_fence(response))
        except ValueError:
            return False
        return isinstance(obj, dict) and self.kwargs["key"] in obj


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

#: ids checked and worded by lm-eval's IFEval checkers (``json_key`` is ours)
IFEVAL_IDS = frozenset(i for i, cls in REGISTRY.items() if cls.ifeval)


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

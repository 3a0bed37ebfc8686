"""Preference formats: detection and per-row normalization to the pair schema.

Formats (``SourceConfig.format``; ``auto`` detects from the columns and first rows):

``standard``
    ``prompt``, ``chosen``, ``rejected`` strings (TRL "standard" preference format;
    e.g. the ultrafeedback_binarized samples in shared/). Optional ``system``
    column, scores from ``score_chosen``/``score_rejected`` columns or a
    ``metadata`` dict (or its Python-repr string, parsed with ``ast.literal_eval``).
``conversational``
    ``chosen``/``rejected`` message lists, with an explicit ``prompt`` (string or
    messages) when they hold assistant turns only, or an implicit prompt: when they
    hold the whole conversation (trl-lib/ultrafeedback_binarized,
    mlabonne/orpo-dpo-mix-40k, HuggingFaceH4/ultrafeedback_binarized) the longest
    common message prefix is the prompt and the rest are the completions.
``hh``
    Anthropic HH-RLHF transcripts ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``: both
    transcripts are split into turns; all but the final assistant turn form the
    multi-turn prompt, the final assistant turns are chosen/rejected.
``sharegpt``
    LLaMA-Factory's preference layout: ``conversations`` [{from, value}] (the
    prompt), ``chosen``/``rejected`` {from, value}, optional ``system`` column.
``ratings``
    one prompt with several rated completions, binarized by :mod:`.binarize`:
    openbmb/UltraFeedback (``instruction`` + ``completions[*]`` with ``response``,
    ``overall_score`` and ``annotations`` {aspect: {Rating: "4", ...}}) or generic
    ``prompt`` + ``responses`` + ``scores``. UltraFeedback's per-completion
    ``custom_system_prompt`` is not used (as in the Zephyr recipe): the prompt is
    the instruction alone.

Column mapping (``SourceConfig.columns``) maps canonical names to the source's
column names; AutoTrain's ``prompt_text_column`` / ``text_column`` /
``rejected_text_column`` are accepted as aliases of ``prompt`` / ``chosen`` /
``rejected``.

Detection is per file: each file of a source (each file of a folder) gets its own
format, judged on its first rows by majority (:func:`resolve_file_format`), and
every row is then checked against it (:meth:`FileLayout.check`): a row that
carries the keys of another format (``responses`` + ``scores`` or
``conversations`` in a ``standard`` file) is a row-level ``foreign_keys`` error
naming those keys, never a reason to read the file as another format.

Structural problems inside a well-formed pair source (chosen and rejected that
do not share a prompt ending with a user turn, a rated row where all scores tie)
are not errors: the row is dropped with a reason (:class:`DropRow`) and counted.
"""

from __future__ import annotations

import ast
import difflib
import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from orpo_core.config import SourceConfig
from orpo_core.data.binarize import select_pairs
from orpo_core.data.errors import (
    BAD_CONFIG,
    BAD_CONVERSATION,
    BAD_SCORE,
    FOREIGN_KEYS,
    MISSING_COLUMN,
    MISSING_FIELD,
    NON_STRING,
    TOO_FEW_COMPLETIONS,
    DataError,
    DropRow,
    RowRef,
    short,
)
from orpo_core.data.schema import (
    Message,
    check_completion,
    check_prompt,
    to_messages,
    to_score,
)

FORMATS = ("standard", "conversational", "hh", "sharegpt", "ratings")

#: canonical column names a recipe may map in ``columns``
CANONICAL_COLUMNS = (
    "prompt",
    "chosen",
    "rejected",
    "system",
    "conversations",
    "instruction",
    "completions",
    "responses",
    "scores",
    "score_chosen",
    "score_rejected",
    "metadata",
)
#: AutoTrain's column option names -> canonical names
COLUMN_ALIASES = {"prompt_text_column": "prompt", "text_column": "chosen", "rejected_text_column": "rejected"}

PROMPT_MISMATCH = "prompt_mismatch"
IDENTICAL = "identical"
EMPTY_COMPLETION = "empty_completion"

_HH_MARKER = re.compile(r"\n\n(Human|Assistant):[ \t]?")


# --------------------------------------------------------------------------- columns
class ColumnMap:
    """Canonical name -> source column name, from ``SourceConfig.columns``.

    Raises:
        DataError: ``bad_config`` (fatal) for an unknown canonical key (with a
            difflib suggestion) or a key given twice through an AutoTrain alias.
    """

    def __init__(self, mapping: dict[str, str], where: str) -> None:
        self.mapping: dict[str, str] = {}
        for key, col in mapping.items():
            canonical = COLUMN_ALIASES.get(key, key)
            if canonical not in CANONICAL_COLUMNS:
                hint = difflib.get_close_matches(key, list(CANONICAL_COLUMNS) + list(COLUMN_ALIASES), n=1)
                raise DataError(
                    f"unknown column role {key!r} in 'columns'"
                    + (f" (did you mean {hint[0]!r}?)" if hint else "")
                    + f"; valid: {', '.join(CANONICAL_COLUMNS + tuple(COLUMN_ALIASES))}",
                    file=where,
                    field=f"columns.{key}",
                    reason=BAD_CONFIG,
                    fatal=True,
                )
            if canonical in self.mapping:
                raise DataError(
                    f"column role {canonical!r} is mapped twice (directly and through an AutoTrain alias)",
                    file=where,
                    field=f"columns.{key}",
                    reason=BAD_CONFIG,
                    fatal=True,
                )
            self.mapping[canonical] = col
        self._inverse: dict[str, tuple[str, ...]] = {}  # source column -> canonical names it holds
        for c in CANONICAL_COLUMNS:
            self._inverse[self.col(c)] = self._inverse.get(self.col(c), ()) + (c,)

    def col(self, canonical: str) -> str:
        """The source column holding ``canonical``."""
        return self.mapping.get(canonical, canonical)

    def present(self, columns: Iterable[str]) -> set[str]:
        """Canonical names whose column exists in ``columns``."""
        cols = set(columns)
        return {c for c in CANONICAL_COLUMNS if self.col(c) in cols}


def missing_column_error(
    needed: str, cmap: ColumnMap, columns: Iterable[str], where: RowRef | str, fmt: str
) -> DataError:
    """A fatal ``missing_column`` error naming the column, the closest present column
    (difflib) and the ``columns:`` mapping that would fix it."""
    cols = sorted(set(columns))
    col = cmap.col(needed)
    mapped = f" (mapped from {needed!r})" if col != needed else ""
    close = difflib.get_close_matches(col, cols, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}? (set columns: {{{needed}: {close[0]}}})" if close else ""
    msg = f"missing column {col!r}{mapped} needed by the {fmt} format{hint}; columns present: {cols}"
    if isinstance(where, RowRef):
        return DataError(msg, ref=where, field=col, reason=MISSING_COLUMN, fatal=True)
    return DataError(msg, file=where, field=col, reason=MISSING_COLUMN, fatal=True)


def required_columns(fmt: str, present: set[str]) -> list[str]:
    """Canonical columns a format needs, given the canonical columns present."""
    if fmt == "standard":
        return ["prompt", "chosen", "rejected"]
    if fmt in ("conversational", "hh"):
        return ["chosen", "rejected"]
    if fmt == "sharegpt":
        return ["conversations", "chosen", "rejected"]
    if fmt == "ratings":
        prompt = "instruction" if "instruction" in present and "prompt" not in present else "prompt"
        if "completions" in present or not ({"responses", "scores"} & present):
            return [prompt, "completions"]
        return [prompt, "responses", "scores"]
    raise ValueError(f"unknown format {fmt!r}")


def detect_format(present: set[str], sample: list[dict[str, Any]], cmap: ColumnMap) -> str | None:
    """Guess the format from the canonical columns present and a few rows.

    Rules, in order: ``completions`` or ``responses``+``scores`` -> ratings;
    ``conversations`` -> sharegpt; ``chosen``/``rejected`` holding message lists
    -> conversational; strings with ``prompt`` -> standard; strings with HH
    markers (``\\n\\nHuman:``) and no prompt -> hh. Returns None when nothing fits.
    """
    if "completions" in present or {"responses", "scores"} <= present:
        return "ratings"
    if "conversations" in present:
        return "sharegpt"
    if {"chosen", "rejected"} <= present:
        values = [r.get(cmap.col("chosen")) for r in sample]
        values = [v for v in values if v is not None]
        if values and all(isinstance(v, (list, tuple)) for v in values[:20]):
            return "conversational"
        if "prompt" in present:
            return "standard"
        if values and isinstance(values[0], str) and "\n\nAssistant:" in values[0] and "Human:" in values[0]:
            return "hh"
        return "standard"
    return None


#: the canonical columns each format reads
FORMAT_KEYS: dict[str, frozenset[str]] = {
    "standard": frozenset({"prompt", "chosen", "rejected", "system", "score_chosen", "score_rejected", "metadata"}),
    "conversational": frozenset(
        {"prompt", "chosen", "rejected", "system", "score_chosen", "score_rejected", "metadata"}
    ),
    "hh": frozenset({"chosen", "rejected"}),
    "sharegpt": frozenset({"conversations", "chosen", "rejected", "system"}),
    "ratings": frozenset({"prompt", "instruction", "completions", "responses", "scores"}),
}
#: formats that share a key layout (standard / conversational / hh differ only in value types)
FAMILY = {"standard": "pair", "conversational": "pair", "hh": "pair", "sharegpt": "sharegpt", "ratings": "ratings"}
#: the keys that make a row fit a family (see :func:`row_family`)
SIGNATURE_KEYS = frozenset({"chosen", "rejected", "conversations", "completions", "responses", "scores"})
_FAMILY_NAME = {"pair": "standard/conversational/hh", "sharegpt": "sharegpt", "ratings": "ratings"}


def row_family(keys: set[str] | frozenset[str]) -> str | None:
    """The key layout one row fits, from its canonical keys with a non-null value.

    ``completions`` or ``responses`` + ``scores`` -> ``"ratings"``; ``conversations`` ->
    ``"sharegpt"``; ``chosen`` + ``rejected`` -> ``"pair"``; else None (too few keys to tell,
    left to the row's normalizer, which names the missing field).
    """
    if "completions" in keys or ("responses" in keys and "scores" in keys):
        return "ratings"
    if "conversations" in keys:
        return "sharegpt"
    if "chosen" in keys and "rejected" in keys:
        return "pair"
    return None


def row_keys(rec: dict[str, Any], cmap: ColumnMap) -> set[str]:
    """Canonical names whose column is in ``rec`` with a value (not None, not "": an empty CSV cell)."""
    inverse = cmap._inverse
    return {c for k, v in rec.items() if k in inverse and v is not None and v != "" for c in inverse[k]}


@dataclass
class FileLayout:
    """The format of one file and what its rows may carry.

    Attributes:
        name: the file (for messages).
        fmt: the format used to normalize the file's rows.
        family: the key layout most of the sampled rows fit (:func:`row_family`), or
            None when no sampled row had enough keys to tell.
        present: canonical columns of the file's layout (sampled rows of that family,
            or the schema of a columnar file).
        votes: rows of the sample that fit ``family`` / rows sampled.
    """

    name: str
    fmt: str
    family: str | None
    present: frozenset[str]
    cmap: ColumnMap
    votes: tuple[int, int] = (0, 0)

    def check(self, rec: dict[str, Any], ref: RowRef) -> None:
        """Raise when ``rec`` carries the keys of another format than its file's.

        Raises:
            DataError: ``foreign_keys`` (row-level) naming the line and the keys that do not belong.
        """
        if self.family is None:
            return
        keys = row_keys(rec, self.cmap)
        fam = row_family(keys)
        if fam is None or fam == self.family:
            return
        foreign = sorted((keys & SIGNATURE_KEYS) - self.present - FORMAT_KEYS[self.fmt])
        if not foreign:
            return  # e.g. a row lacking one key of the file's layout: its normalizer names the missing field
        cols = [self.cmap.col(k) for k in foreign]
        raise DataError(
            f"key{'s' if len(cols) > 1 else ''} {', '.join(repr(c) for c in cols)} "
            f"belong{'' if len(cols) > 1 else 's'} to the {_FAMILY_NAME[fam]} format, but this file is "
            f"{self.fmt} ({self.votes[0]} of the first {self.votes[1]} rows); "
            f"remove {'them' if len(cols) > 1 else 'it'}, or move the row to a file of its own",
            ref=ref,
            field=cols[0],
            reason=FOREIGN_KEYS,
        )


def closest_format(present: set[str]) -> str:
    """The format missing the fewest required columns (for the error message)."""
    best = min(FORMATS, key=lambda f: (len(set(required_columns(f, present)) - present), FORMATS.index(f)))
    return best


# --------------------------------------------------------------------------- helpers
def _lcp(a: list[Message], b: list[Message]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _same(a: list[Message], b: list[Message]) -> bool:
    return [(m["role"], m["content"].strip()) for m in a] == [(m["role"], m["content"].strip()) for m in b]


def split_conversations(
    prompt: list[Message] | None,
    chosen: list[Message],
    rejected: list[Message],
    fields: tuple[str, str, str] = ("prompt", "chosen", "rejected"),
) -> tuple[list[Message], list[Message], list[Message]]:
    """Return (prompt, chosen, rejected) with assistant-only completions.

    When chosen/rejected hold only assistant messages, ``prompt`` is used as is.
    Otherwise they hold whole conversations and the longest common message
    prefix is the prompt (``prompt`` is then ignored), as TRL's
    ``extract_prompt`` (trl/data_utils.py) does for implicit-prompt datasets.

    Raises:
        DataError: ``missing_field`` when an explicit prompt is needed but absent;
            ``bad_conversation`` for an invalid prompt (system turn not first, ...).
        DropRow: ``identical`` (same conversation twice), ``empty_completion`` (one is a
            prefix of the other), ``prompt_mismatch`` (the common prefix does not end
            with a user turn, or the completions contain non-assistant turns).
    """
    pfield, cfield, rfield = fields
    whole = any(m["role"] != "assistant" for m in chosen) or any(m["role"] != "assistant" for m in rejected)
    if not whole:
        if prompt is None:
            raise DataError(
                f"'{cfield}'/'{rfield}' hold assistant messages only, so a prompt column is needed",
                field=pfield,
                reason=MISSING_FIELD,
            )
        return check_prompt(prompt, pfield), chosen, rejected
    if _same(chosen, rejected):
        raise DropRow(IDENTICAL, "chosen and rejected conversations are identical")
    n = _lcp(chosen, rejected)
    shared, c, r = chosen[:n], chosen[n:], rejected[n:]
    if not c or not r:
        raise DropRow(EMPTY_COMPLETION, "one conversation is a prefix of the other")
    if not shared or shared[-1]["role"] != "user":
        raise DropRow(PROMPT_MISMATCH, "the shared conversation prefix does not end with a user turn")
    if any(m["role"] != "assistant" for m in c + r):
        raise DropRow(PROMPT_MISMATCH, "chosen and rejected diverge before their final assistant turns")
    return check_prompt(shared, f"{cfield}[:{n}]"), c, r


def with_system(prompt: list[Message], system: Any, field: str) -> list[Message]:
    """Prepend a system message from a ``system`` column (None/"" = none).

    Raises:
        DataError: ``non_string`` when the value is not a string.
    """
    if system is None or (isinstance(system, str) and not system.strip()):
        return prompt
    if not isinstance(system, str):
        raise DataError(
            f"expected a string, got {type(system).__name__} {short(system)}", field=field, reason=NON_STRING
        )
    if prompt and prompt[0]["role"] == "system":
        return prompt
    return [{"role": "system", "content": system}] + prompt


def parse_metadata_scores(value: Any, field: str) -> tuple[float | None, float | None]:
    """Scores from a ``metadata`` value: a dict or its Python-repr / JSON string
    (``"{'score_chosen': 9.0, 'score_rejected': 8.0}"``), parsed with
    :func:`ast.literal_eval` (never ``eval``).

    Raises:
        DataError: ``bad_score`` when the string is not a literal dict or a score is not numeric.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, None
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise DataError(f"cannot parse metadata {short(value)}", field=field, reason=BAD_SCORE) from None
    if not isinstance(value, dict):
        raise DataError(f"metadata must be a mapping, got {type(value).__name__}", field=field, reason=BAD_SCORE)
    return (
        to_score(value.get("score_chosen"), f"{field}.score_chosen"),
        to_score(value.get("score_rejected"), f"{field}.score_rejected"),
    )


def parse_hh(text: Any, field: str) -> list[Message]:
    """Split an HH-RLHF transcript into messages (Human -> user, Assistant -> assistant).

    Contents are stripped; consecutive turns of the same speaker (a transcript
    artifact in HH-RLHF) are merged with a blank line so roles alternate.

    Raises:
        DataError: ``non_string`` for a non-string, ``bad_conversation`` when there is
            no turn marker, text before the first marker, or the first turn is not Human.
    """
    if not isinstance(text, str):
        raise DataError(
            f"expected a transcript string, got {type(text).__name__} {short(text)}", field=field, reason=NON_STRING
        )
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    parts = _HH_MARKER.split(text)
    if len(parts) < 3:
        raise DataError(
            "no '\\n\\nHuman:' / '\\n\\nAssistant:' turn markers (is this really the hh format?)",
            field=field,
            reason=BAD_CONVERSATION,
        )
    if parts[0].strip():
        raise DataError(f"text before the first turn marker: {short(parts[0])}", field=field, reason=BAD_CONVERSATION)
    messages: list[Message] = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        content = content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = (messages[-1]["content"] + "\n\n" + content).strip()
        else:
            messages.append({"role": role, "content": content})
    if messages[0]["role"] != "user":
        raise DataError("transcript must start with a Human turn", field=field, reason=BAD_CONVERSATION)
    return messages


def annotation_score(annotations: Any, field: str) -> float | None:
    """UltraFeedback fine-grained score: mean of the numeric ``Rating`` of each aspect
    (helpfulness, honesty, instruction_following, truthfulness); "N/A" ratings are
    ignored; None when no aspect has a numeric rating.

    Raises:
        DataError: ``bad_score`` when ``annotations`` is not a mapping.
    """
    if not isinstance(annotations, dict):
        raise DataError(
            f"expected a mapping aspect -> {{Rating: ...}}, got {type(annotations).__name__}",
            field=field,
            reason=BAD_SCORE,
        )
    ratings: list[float] = []
    for aspect, ann in annotations.items():
        items = ann if isinstance(ann, list) else [ann]
        for it in items:
            raw = it.get("Rating") if isinstance(it, dict) else it
            if isinstance(raw, float) and not math.isfinite(raw):
                to_score(raw, f"{field}.{aspect}.Rating")  # raises bad_score
            try:
                v = to_score(raw, f"{field}.{aspect}.Rating")
            except DataError:
                v = None  # "N/A" and similar
            if v is not None:
                ratings.append(v)
    return sum(ratings) / len(ratings) if ratings else None


# --------------------------------------------------------------------------- normalizer
_MISSING = object()


@dataclass
class Normalizer:
    """Turns raw records of one source into normalized pairs.

    Call with ``(record, ref)``; returns a list of pair dicts (keys ``prompt``,
    ``chosen``, ``rejected``, ``score_chosen``, ``score_rejected``), usually one.

    Raises (from ``__call__``):
        DataError: row-level problems, located at ``ref`` and naming the field.
        DropRow: a well-formed row without a usable pair.
    """

    fmt: str
    cmap: ColumnMap
    src: SourceConfig
    rng: random.Random
    counters: Counter = field(default_factory=Counter)
    layout: FileLayout | None = None  # when set, every row is checked against its file's layout first

    def __post_init__(self) -> None:
        handlers: dict[str, Callable[[dict[str, Any]], list[dict[str, Any]]]] = {
            "standard": self._pair,
            "conversational": self._pair,
            "hh": self._hh,
            "sharegpt": self._sharegpt,
            "ratings": self._ratings,
        }
        self._handler = handlers[self.fmt]

    def __call__(self, rec: Any, ref: RowRef) -> list[dict[str, Any]]:
        if not isinstance(rec, dict):
            raise DataError(f"expected a record (mapping), got {type(rec).__name__}", ref=ref, reason=NON_STRING)
        if self.layout is not None:
            self.layout.check(rec, ref)
        try:
            return self._handler(rec)
        except DataError as e:
            raise e.at(ref) from None

    # -- field access
    def _get(self, rec: dict[str, Any], canonical: str, required: bool = True) -> Any:
        col = self.cmap.col(canonical)
        value = rec.get(col, _MISSING)
        if value is _MISSING:
            if required:
                raise DataError("missing in this row", field=col, reason=MISSING_FIELD)
            return None
        return value

    def _messages(self, rec: dict[str, Any], canonical: str, role: str, required: bool = True) -> list[Message] | None:
        value = self._get(rec, canonical, required)
        if value is None and not required:
            return None
        return to_messages(value, self.cmap.col(canonical), role)

    def _scores(self, rec: dict[str, Any]) -> tuple[float | None, float | None]:
        sc = to_score(self._get(rec, "score_chosen", False), self.cmap.col("score_chosen"))
        sr = to_score(self._get(rec, "score_rejected", False), self.cmap.col("score_rejected"))
        if sc is None and sr is None:
            meta = self._get(rec, "metadata", False)
            if meta is not None:
                sc, sr = parse_metadata_scores(meta, self.cmap.col("metadata"))
        return sc, sr

    @staticmethod
    def _out(prompt, chosen, rejected, sc=None, sr=None) -> dict[str, Any]:
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "score_chosen": sc, "score_rejected": sr}

    # -- formats
    def _pair(self, rec: dict[str, Any]) -> list[dict[str, Any]]:
        """standard and conversational: explicit or implicit prompt."""
        cfield, rfield, pfield = (self.cmap.col(c) for c in ("chosen", "rejected", "prompt"))
        chosen = self._messages(rec, "chosen", "assistant")
        rejected = self._messages(rec, "rejected", "assistant")
        prompt = self._messages(rec, "prompt", "user", required=self.fmt == "standard")
        prompt, chosen, rejected = split_conversations(prompt, chosen, rejected, (pfield, cfield, rfield))
        prompt = with_system(prompt, self._get(rec, "system", False), self.cmap.col("system"))
        check_completion(chosen, cfield)
        check_completion(rejected, rfield)
        return [self._out(prompt, chosen, rejected, *self._scores(rec))]

    def _hh(self, rec: dict[str, Any]) -> list[dict[str, Any]]:
        cfield, rfield = self.cmap.col("chosen"), self.cmap.col("rejected")
        chosen = parse_hh(self._get(rec, "chosen"), cfield)
        rejected = parse_hh(self._get(rec, "rejected"), rfield)
        for msgs, f in ((chosen, cfield), (rejected, rfield)):
            if msgs[-1]["role"] != "assistant":
                raise DataError("transcript must end with an Assistant turn", field=f, reason=BAD_CONVERSATION)
        if chosen[:-1] != rejected[:-1]:
            self.counters["hh_prompt_mismatch"] += 1
            raise DropRow(PROMPT_MISMATCH, "chosen and rejected transcripts differ before the final Assistant turn")
        prompt = check_prompt(chosen[:-1], f"{cfield}[:-1]")
        return [self._out(prompt, chosen[-1:], rejected[-1:])]

    def _sharegpt(self, rec: dict[str, Any]) -> list[dict[str, Any]]:
        conv_field = self.cmap.col("conversations")
        conv = self._get(rec, "conversations")
        if not isinstance(conv, (list, tuple)):
            raise DataError(
                f"expected a list of {{from, value}} messages, got {type(conv).__name__} {short(conv)}",
                field=conv_field,
                reason=NON_STRING,
            )
        prompt = to_messages(conv, conv_field, "user")
        prompt = with_system(prompt, self._get(rec, "system", False), self.cmap.col("system"))
        check_prompt(prompt, conv_field)
        chosen = check_completion(self._messages(rec, "chosen", "assistant"), self.cmap.col("chosen"))
        rejected = check_completion(self._messages(rec, "rejected", "assistant"), self.cmap.col("rejected"))
        return [self._out(prompt, chosen, rejected)]

    def _ratings(self, rec: dict[str, Any]) -> list[dict[str, Any]]:
        pcanon = "prompt" if self.cmap.col("prompt") in rec or "prompt" in self.cmap.mapping else "instruction"
        pfield = self.cmap.col(pcanon)
        prompt = check_prompt(to_messages(self._get(rec, pcanon), pfield, "user"), pfield)
        bcfg = self.src.binarize
        responses: list[list[Message]] = []
        scores: list[float | None] = []
        if self.cmap.col("completions") in rec or "completions" in self.cmap.mapping:
            cfield = self.cmap.col("completions")
            comps = self._get(rec, "completions")
            if not isinstance(comps, (list, tuple)):
                raise DataError(
                    f"expected a list of completions, got {type(comps).__name__}", field=cfield, reason=NON_STRING
                )
            if len(comps) < 2:
                raise DataError(
                    f"a ratings row needs at least two completions, found {len(comps)}",
                    field=cfield,
                    reason=TOO_FEW_COMPLETIONS,
                )
            for i, comp in enumerate(comps):
                f = f"{cfield}[{i}]"
                if not isinstance(comp, dict):
                    raise DataError(
                        f"expected a completion object, got {type(comp).__name__}", field=f, reason=NON_STRING
                    )
                if "response" not in comp:
                    raise DataError("completion has no 'response'", field=f"{f}.response", reason=MISSING_FIELD)
                resp = comp["response"]
                if not isinstance(resp, str):
                    raise DataError(
                        f"response must be a string, got {type(resp).__name__} {short(resp)}",
                        field=f"{f}.response",
                        reason=NON_STRING,
                    )
                responses.append([{"role": "assistant", "content": resp}])
                if bcfg.score == "annotations":
                    if "annotations" not in comp:
                        raise DataError(
                            "completion has no 'annotations'", field=f"{f}.annotations", reason=MISSING_FIELD
                        )
                    scores.append(annotation_score(comp["annotations"], f"{f}.annotations"))
                else:
                    if bcfg.score not in comp:
                        keys = difflib.get_close_matches(bcfg.score, [str(k) for k in comp], n=1)
                        raise DataError(
                            f"completion has no score {bcfg.score!r}"
                            + (f" (did you mean {keys[0]!r}?)" if keys else ""),
                            field=f"{f}.{bcfg.score}",
                            reason=MISSING_FIELD,
                        )
                    scores.append(to_score(comp[bcfg.score], f"{f}.{bcfg.score}"))
        else:
            rfield, sfield = self.cmap.col("responses"), self.cmap.col("scores")
            resps, raw_scores = self._get(rec, "responses"), self._get(rec, "scores")
            for v, f in ((resps, rfield), (raw_scores, sfield)):
                if not isinstance(v, (list, tuple)):
                    raise DataError(f"expected a list, got {type(v).__name__} {short(v)}", field=f, reason=NON_STRING)
            if len(resps) < 2:
                raise DataError(
                    f"a ratings row needs at least two responses, found {len(resps)}",
                    field=rfield,
                    reason=TOO_FEW_COMPLETIONS,
                )
            if len(raw_scores) != len(resps):
                raise DataError(f"{len(raw_scores)} scores for {len(resps)} responses", field=sfield, reason=BAD_SCORE)
            for i, (resp, s) in enumerate(zip(resps, raw_scores)):
                responses.append(check_completion(to_messages(resp, f"{rfield}[{i}]", "assistant"), f"{rfield}[{i}]"))
                scores.append(to_score(s, f"{sfield}[{i}]"))
        pairs = select_pairs(scores, bcfg.strategy, bcfg.margin, self.rng, self.counters)
        return [self._out(prompt, responses[i], responses[j], scores[i], scores[j]) for i, j in pairs]


def resolve_file_format(
    src: SourceConfig,
    cmap: ColumnMap,
    columns: Iterable[str] | None,
    sample: list[dict[str, Any]],
    where: RowRef | str,
    name: str | None = None,
) -> FileLayout:
    """The format of one file (``src.format`` or detected), after checking its required columns.

    Each sampled row votes for the key layout it fits (:func:`row_family`); the
    layout of most rows (the earliest on a tie) is the file's, and only rows of
    that layout are used to infer JSON columns and pick the format, so a stray
    row never decides the format of the others.

    Args:
        columns: the schema columns of a columnar file (CSV, Parquet, Hub), or None (JSON).
        sample: the first readable records of the file.
        where: the location for missing-column errors (the first record).

    Raises:
        DataError: ``missing_column`` (fatal) naming the missing column, the closest
            present column and the format it was needed for.
    """
    keyed = [(row_keys(r, cmap), r) for r in sample]
    votes: Counter = Counter()
    first_seen: dict[str, int] = {}
    for i, (k, _) in enumerate(keyed):
        fam = row_family(k)
        if fam is not None:
            votes[fam] += 1
            first_seen.setdefault(fam, i)
    family = min(votes, key=lambda f: (-votes[f], first_seen[f])) if votes else None
    rows = [r for k, r in keyed if row_family(k) == family] if family else sample
    row_present: set[str] = set().union(*(k for k, _ in keyed if family is None or row_family(k) == family))
    if columns is not None:
        cols = set(columns)
        # the schema's signature columns of another layout (null in this layout's rows) do not count
        present = (cmap.present(cols) - SIGNATURE_KEYS) | row_present if family else cmap.present(cols)
    else:
        cols = {str(k) for r in rows for k in r}
        present = cmap.present(cols)
    # a mapped column that does not exist is an error even if the format could do without it
    for canonical, col in cmap.mapping.items():
        if col not in cols:
            raise missing_column_error(
                canonical, cmap, cols, where, src.format if src.format != "auto" else "configured"
            )
    fmt = src.format if src.format != "auto" else detect_format(present, rows, cmap)
    if fmt is None:
        fmt = closest_format(present)
    for need in required_columns(fmt, present):
        if need not in present:
            raise missing_column_error(need, cmap, cols, where, fmt)
    return FileLayout(
        name=name or str(where),
        fmt=fmt,
        family=family,
        present=frozenset(present),
        cmap=cmap,
        votes=(votes[family] if family else 0, len(sample)),
    )


def resolve_format(
    src: SourceConfig,
    cmap: ColumnMap,
    columns: Iterable[str],
    sample: list[dict[str, Any]],
    where: RowRef | str,
) -> str:
    """The format name of :func:`resolve_file_format` (kept for callers that need only the name)."""
    return resolve_file_format(src, cmap, columns, sample, where).fmt

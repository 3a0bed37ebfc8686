"""The normalized preference schema, message normalization and Parquet I/O.

A normalized pair (one row of ``data/train.parquet`` / ``data/test.parquet``):

=================  ==========================================  =============================================
column             arrow type                                  meaning
=================  ==========================================  =============================================
``prompt``         list<struct<role: string, content: string>>  the conversation so far; optional system turn
                                                               first, ends with a user turn
``chosen``         same                                        preferred assistant message(s) (normally one)
``rejected``       same                                        dispreferred assistant message(s)
``source``         string                                      source label (recipe ``label`` or path)
``score_chosen``   float64, nullable                           rating of chosen when the source has one
``score_rejected`` float64, nullable                           rating of rejected
``origin``         string                                      ``"<file or hub id>:<row or line number>"``
``constraints``    string, nullable                            verifiable instructions of the prompt, JSON
                                                               ``[{"id", "kwargs"}]`` (synthetic instructions;
                                                               see ``orpo_core.data.synthetic.instructions``)
=================  ==========================================  =============================================

The same layout as TRL's conversational preference format (``prompt`` /
``chosen`` / ``rejected`` message lists, see TRL "Dataset formats"), so the
files can also be fed to ``trl.experimental.orpo.ORPOTrainer`` directly.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from orpo_core.data.errors import (
    BAD_CONVERSATION,
    BAD_SCORE,
    MISSING_FIELD,
    NON_STRING,
    UNKNOWN_ROLE,
    DataError,
    short,
)

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES_TYPE = pa.list_(MESSAGE_TYPE)
PAIR_SCHEMA = pa.schema(
    [
        ("prompt", MESSAGES_TYPE),
        ("chosen", MESSAGES_TYPE),
        ("rejected", MESSAGES_TYPE),
        ("source", pa.string()),
        ("score_chosen", pa.float64()),
        ("score_rejected", pa.float64()),
        ("origin", pa.string()),
        ("constraints", pa.string()),
    ]
)
COLUMNS = tuple(PAIR_SCHEMA.names)

#: accepted role spellings -> canonical role (ShareGPT uses human/gpt, Gemma uses model)
ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
}

Message = dict[str, str]


def to_messages(value: Any, field: str, default_role: str) -> list[Message]:
    """Normalize one field into a list of ``{"role", "content"}`` messages.

    Accepts a string (one message with ``default_role``), one message dict, or a
    list of message dicts. A message has ``role``/``content`` (OpenAI/TRL) or
    ``from``/``value`` (ShareGPT) keys; roles are mapped through
    :data:`ROLE_ALIASES`.

    Raises:
        DataError: ``missing_field`` (null value or a message without role/content),
            ``non_string`` (content that is not a string), ``unknown_role``.
            The error has no row yet; the caller adds it with :meth:`DataError.at`.
    """
    if value is None:
        raise DataError("value is null", field=field, reason=MISSING_FIELD)
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, dict):
        return [_message(value, field)]
    if isinstance(value, (list, tuple)):
        return [_message(m, f"{field}[{i}]") for i, m in enumerate(value)]
    raise DataError(
        f"expected a string or a list of messages, got {type(value).__name__} {short(value)}",
        field=field,
        reason=NON_STRING,
    )


def _message(m: Any, field: str) -> Message:
    if not isinstance(m, dict):
        raise DataError(
            f"expected a message {{role, content}}, got {type(m).__name__} {short(m)}", field=field, reason=NON_STRING
        )
    role_key = "role" if "role" in m else "from" if "from" in m else None
    content_key = "content" if "content" in m else "value" if "value" in m else None
    if role_key is None:
        raise DataError(f"message has no 'role' (or 'from') key: {short(m)}", field=field, reason=MISSING_FIELD)
    if content_key is None:
        raise DataError(f"message has no 'content' (or 'value') key: {short(m)}", field=field, reason=MISSING_FIELD)
    role = m[role_key]
    canonical = ROLE_ALIASES.get(role.strip().lower()) if isinstance(role, str) else None
    if canonical is None:
        raise DataError(
            f"unknown role {short(role)} (expected one of {sorted(ROLE_ALIASES)})",
            field=f"{field}.{role_key}",
            reason=UNKNOWN_ROLE,
        )
    content = m[content_key]
    if not isinstance(content, str):
        raise DataError(
            f"message content must be a string, got {type(content).__name__} {short(content)}",
            field=f"{field}.{content_key}",
            reason=NON_STRING,
        )
    return {"role": canonical, "content": content}


def check_prompt(prompt: list[Message], field: str = "prompt") -> list[Message]:
    """Validate a prompt: non-empty, a system turn only first, ends with a user turn.

    Raises:
        DataError: ``bad_conversation`` naming the offending message index.
    """
    if not prompt:
        raise DataError("prompt has no messages", field=field, reason=BAD_CONVERSATION)
    for i, m in enumerate(prompt):
        if m["role"] == "system" and i != 0:
            raise DataError(
                "a system message is only allowed first", field=f"{field}[{i}].role", reason=BAD_CONVERSATION
            )
    if prompt[-1]["role"] != "user":
        raise DataError(
            f"prompt must end with a user turn, ends with {prompt[-1]['role']!r}",
            field=f"{field}[{len(prompt) - 1}].role",
            reason=BAD_CONVERSATION,
        )
    return prompt


def check_completion(messages: list[Message], field: str) -> list[Message]:
    """Validate a completion: assistant messages only (an empty list is left to cleaning).

    Raises:
        DataError: ``bad_conversation`` naming the first non-assistant message.
    """
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            raise DataError(
                f"a completion holds assistant messages only, found role {m['role']!r}",
                field=f"{field}[{i}].role",
                reason=BAD_CONVERSATION,
            )
    return messages


def to_score(value: Any, field: str) -> float | None:
    """A score as float (None/"" -> None; numeric strings accepted).

    Raises:
        DataError: ``bad_score`` for booleans, non-numeric strings, other types, and
            NaN or infinite values (``NaN`` / ``Infinity`` in JSON, ``nan`` / ``inf`` in CSV),
            which would silently decide or void a comparison.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise DataError(f"score must be a number, got {value!r}", field=field, reason=BAD_SCORE)
    if isinstance(value, (int, float)):
        f = float(value)
    elif isinstance(value, str):
        try:
            f = float(value)
        except ValueError:
            raise DataError(f"score must be a number, got {short(value)}", field=field, reason=BAD_SCORE) from None
    else:
        try:  # numpy scalars
            f = float(value)
        except (TypeError, ValueError):
            raise DataError(
                f"score must be a number, got {type(value).__name__} {short(value)}", field=field, reason=BAD_SCORE
            ) from None
    if not math.isfinite(f):
        raise DataError(
            f"score must be a finite number, got {value!r}", field=field, reason=BAD_SCORE
        )
    return f


def pairs_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Build a :data:`PAIR_SCHEMA` table from normalized row dicts (extra keys ignored)."""
    return pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows], schema=PAIR_SCHEMA)


def write_pairs(rows: list[dict[str, Any]], path: str | os.PathLike) -> int:
    """Write normalized rows to a zstd-compressed Parquet file with :data:`PAIR_SCHEMA`.

    Returns:
        the number of rows written.
    """
    table = pairs_to_table(rows)
    pq.write_table(table, str(path), compression="zstd")
    return table.num_rows


def read_pairs(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a normalized Parquet file back as a list of row dicts (messages as dicts)."""
    table = pq.read_table(str(Path(path)))
    return table.to_pylist()

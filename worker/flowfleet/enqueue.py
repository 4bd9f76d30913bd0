"""Putting records on the queue: validation, COPY encoding and the enqueue itself.

Its own module because producers need nothing else of the queue; ``flowfleet.queue``
re-exports every name here, so ``queue.enqueue`` and friends keep working.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import psycopg

from flowfleet.errors import InvalidRecordError
from flowfleet.sql import query

MAX_FLOW_NAME = 100
MAX_DELAY_SECONDS = 10 * 365 * 24 * 3600

# json.dumps writes a NUL character as \u0000; an escaped backslash followed by "u0000"
# (an even run of backslashes before it) is ordinary text.
_NUL_ESCAPE = re.compile(r"(?:^|[^\\])(?:\\\\)*\\u0000")

DedupKey = str | Callable[[Mapping[str, Any]], Any] | None


def check_flow_name(flow_name: str) -> str:
    if not isinstance(flow_name, str) or not flow_name.strip():
        raise InvalidRecordError("flow name must be a non-empty string")
    if len(flow_name) > MAX_FLOW_NAME:
        raise InvalidRecordError(f"flow name is longer than {MAX_FLOW_NAME} characters")
    if any(ch in flow_name for ch in "\0\t\n\r"):
        raise InvalidRecordError("flow name must not hold control characters")
    return flow_name


def _copy_escape(text: str) -> str:
    # COPY text format: backslash is the escape; json.dumps never emits raw tabs/newlines.
    return text.replace("\\", "\\\\")


def _copy_field(value: str | None) -> str:
    if value is None:
        return "\\N"
    return (
        value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    )


def _dedup_of(record: Mapping[str, Any], dedup_key: DedupKey) -> str | None:
    if dedup_key is None:
        return None
    value = dedup_key(record) if callable(dedup_key) else record.get(dedup_key)
    return None if value is None else str(value)


def encode_records(
    records: Iterable[Any], dedup_key: DedupKey = None
) -> list[tuple[str, str | None]]:
    """Validate and serialise every record before anything is written, so one bad record
    rejects the whole call and nothing is enqueued. Errors name the record's position."""
    encoded: list[tuple[str, str | None]] = []
    for index, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise InvalidRecordError(
                f"record {index}: payload must be a JSON object, got {type(record).__name__}"
            )
        encoded.append((to_json(record, f"record {index}"), _dedup_of(record, dedup_key)))
    return encoded


def to_json(value: Any, what: str) -> str:
    """``value`` as JSON that PostgreSQL's jsonb accepts, or an InvalidRecordError that
    starts with ``what``."""
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRecordError(f"{what}: not JSON-serialisable: {exc}") from None
    if "\\u0000" in text and _NUL_ESCAPE.search(text):
        raise InvalidRecordError(f"{what}: PostgreSQL JSON cannot hold NUL (\\u0000)")
    if "\\ud" in text:
        # Escaped surrogates: a pair is one character, a lone one is text UTF-8 cannot
        # encode and jsonb refuses. Only the rare text holding any pays for this check.
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            lone = exc.object[exc.start : exc.end]
            raise InvalidRecordError(
                f"{what}: holds a lone surrogate (U+{ord(lone[0]):04X}), which is not text "
                "UTF-8 or PostgreSQL can store"
            ) from None
    return text


def enqueue(
    conn: psycopg.Connection,
    flow_name: str,
    records: Iterable[Any],
    *,
    priority: int = 0,
    delay_seconds: float = 0.0,
    dedup_key: DedupKey = None,
) -> int:
    """Bulk-insert records through COPY in one transaction and wake idle workers.

    Returns the number enqueued (with ``dedup_key``, keys already live are skipped).
    """
    check_flow_name(flow_name)
    if not -32768 <= priority <= 32767:
        raise InvalidRecordError(f"priority {priority} is outside -32768..32767")
    if not 0 <= delay_seconds <= MAX_DELAY_SECONDS:
        raise InvalidRecordError(
            f"delay of {delay_seconds} s is outside 0..{MAX_DELAY_SECONDS} (10 years)"
        )
    rows = encode_records(records, dedup_key)
    if not rows:
        return 0
    flow = _copy_escape(flow_name)
    with conn.transaction():
        if dedup_key is None and delay_seconds == 0 and priority == 0:
            # The common case rides on column defaults: the least bytes on the wire.
            with conn.cursor().copy(query("copy_records")) as cp:
                cp.write("".join(f"{flow}\t{_copy_escape(text)}\n" for text, _ in rows))
            count = len(rows)
        else:
            count = _enqueue_staged(conn, flow, rows, priority, delay_seconds)
        conn.execute(query("notify"), {"flow_name": flow_name})
    return count


def _enqueue_staged(
    conn: psycopg.Connection,
    flow: str,
    rows: Sequence[tuple[str, str | None]],
    priority: int,
    delay_seconds: float,
) -> int:
    conn.execute(query("staging_table"))
    available = conn.execute(query("available_after"), {"delay_seconds": delay_seconds}).fetchone()
    assert available is not None
    stamp = available[0].isoformat()
    with conn.cursor().copy(query("copy_staging")) as cp:
        cp.write(
            "".join(
                f"{flow}\t{_copy_escape(text)}\t{priority}\t{stamp}\t{_copy_field(key)}\n"
                for text, key in rows
            )
        )
    cur = conn.execute(query("enqueue_from_staging"))
    return cur.rowcount

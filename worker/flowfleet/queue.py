"""The queue: one function per named query in ``sql/queries.sql``.

Every function takes an open autocommit psycopg connection, so callers choose pooling and
transactions; none knows about Prefect or Kubernetes.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

# The producer side lives in flowfleet.enqueue; re-exported, so callers keep one door.
from flowfleet.enqueue import MAX_DELAY_SECONDS as MAX_DELAY_SECONDS
from flowfleet.enqueue import MAX_FLOW_NAME as MAX_FLOW_NAME
from flowfleet.enqueue import DedupKey as DedupKey
from flowfleet.enqueue import check_flow_name as check_flow_name
from flowfleet.enqueue import encode_records as encode_records
from flowfleet.enqueue import enqueue as enqueue
from flowfleet.enqueue import to_json as to_json
from flowfleet.sql import query

# Times a record's worker may die holding it before the record is failed as the cause.
DEFAULT_MAX_ABANDONS = 3


# A statement that lost a deadlock or a serialization conflict changed nothing and may
# simply run again; these are statement errors on a live connection, not a lost database.
STATEMENT_ATTEMPTS = 8


# SQLSTATEs of a statement or transaction the server rolled back whole so that it may run
# again: serialization_failure and deadlock_detected (psycopg's classes for them share
# no base class but OperationalError, which a lost connection raises too).
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})


def is_retryable(exc: BaseException) -> bool:
    """A deadlock (40P01) or serialization failure (40001): rolled back whole, it can run
    again; the connection is fine."""
    return isinstance(exc, psycopg.Error) and exc.sqlstate in RETRYABLE_SQLSTATES


def _pause(attempt: int) -> None:
    # Jittered, so two statements that deadlocked do not meet again at once.
    time.sleep(min(0.5, 0.005 * 2**attempt) * (0.5 + random.random()))


def _run(conn: psycopg.Connection, statement: str, params: Mapping[str, Any] | None = None) -> Any:
    """Execute ``statement``; run it again when it lost a deadlock or a serialization
    conflict as a transaction of its own (autocommit). Inside a caller's transaction the
    error is the caller's: that transaction is rolled back, not just this statement."""
    for attempt in range(1, STATEMENT_ATTEMPTS + 1):
        try:
            return conn.execute(statement, params)
        except psycopg.OperationalError as exc:
            own_transaction = conn.info.transaction_status == TransactionStatus.IDLE
            if not is_retryable(exc) or not own_transaction or attempt == STATEMENT_ATTEMPTS:
                raise
            _pause(attempt)
    raise AssertionError("unreachable")


def _run_keeper(conn: psycopg.Connection, statement: str, params: Mapping[str, Any]) -> list[Any]:
    """A lease keeper's statement under a lock timeout, with its rows; no rows when a lock
    could not be had in time (the next tick tries again)."""
    for attempt in range(1, STATEMENT_ATTEMPTS + 1):
        try:
            with conn.transaction():
                conn.execute(query("keeper_lock_timeout"))
                return conn.execute(statement, params).fetchall()
        except pg_errors.LockNotAvailable:
            return []
        except psycopg.OperationalError as exc:
            if not is_retryable(exc) or attempt == STATEMENT_ATTEMPTS:
                raise
            _pause(attempt)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Claimed:
    """One claimed record. ``claim_token`` must accompany its completion."""

    id: int
    payload: dict[str, Any]
    retry_count: int
    claim_token: int
    created_at: datetime
    priority: int

    def as_dict(self, flow_name: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "flow_name": flow_name,
            "payload": self.payload,
            "retry_count": self.retry_count,
            "claim_token": self.claim_token,
            "created_at": self.created_at,
            "priority": self.priority,
        }


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 3
    backoff_base: float = 1.0  # seconds before the first retry, doubled on each one
    backoff_cap: float = 300.0


def listen(conn: psycopg.Connection) -> None:
    """Subscribe ``conn`` to enqueue wake-ups. One channel for every flow, with the flow
    name as payload, so flow names never have to become channel identifiers."""
    conn.execute(query("listen"))


def _claimed(rows: list[tuple[Any, ...]]) -> list[Claimed]:
    return [Claimed(*row) for row in rows]


def claim(
    conn: psycopg.Connection,
    flow_name: str,
    instance_id: str,
    batch_size: int,
    lease_seconds: float,
    *,
    max_batch_bytes: int | None = None,
) -> list[Claimed]:
    """Claim up to ``batch_size`` records; with ``max_batch_bytes``, fewer when their
    payloads (as JSON text) would add up to more (the first is always taken)."""
    cur = _run(
        conn,
        query("claim") if max_batch_bytes is None else query("claim_within_bytes"),
        {
            "flow_name": flow_name,
            "instance_id": instance_id,
            "batch_size": batch_size,
            "lease_seconds": lease_seconds,
            "max_batch_bytes": max_batch_bytes,
        },
    )
    return _claimed(cur.fetchall())


def complete_and_claim(
    conn: psycopg.Connection,
    done: Sequence[Claimed],
    flow_name: str,
    instance_id: str,
    batch_size: int,
    lease_seconds: float,
    *,
    max_batch_bytes: int | None = None,
) -> list[Claimed]:
    """Complete ``done`` and claim the next batch in one statement and one commit."""
    cur = _run(
        conn,
        query("complete_and_claim")
        if max_batch_bytes is None
        else query("complete_and_claim_within_bytes"),
        {
            "done_ids": [r.id for r in done],
            "done_tokens": [r.claim_token for r in done],
            "flow_name": flow_name,
            "instance_id": instance_id,
            "batch_size": batch_size,
            "lease_seconds": lease_seconds,
            "max_batch_bytes": max_batch_bytes,
        },
    )
    return _claimed(cur.fetchall())


def complete(
    conn: psycopg.Connection,
    done: Sequence[Claimed] | Sequence[tuple[int, int]],
    results: Sequence[Any] | None = None,
) -> list[int]:
    """Complete records (``Claimed`` or ``(id, claim_token)``); returns the ids that were
    still ours. A record taken back since its claim is absent from the answer."""
    pairs = [(r.id, r.claim_token) if isinstance(r, Claimed) else r for r in done]
    if not pairs:
        return []
    out = results if results is not None else [None] * len(pairs)
    cur = _run(
        conn,
        query("complete"),
        {
            "ids": [p[0] for p in pairs],
            "tokens": [p[1] for p in pairs],
            "results": [None if r is None else Jsonb(r) for r in out],
        },
    )
    return [row[0] for row in cur.fetchall()]


def complete_by_instance(
    conn: psycopg.Connection, record_id: int, instance_id: str, result: Any = None
) -> bool:
    cur = _run(
        conn,
        query("complete_by_instance"),
        {
            "id": record_id,
            "instance_id": instance_id,
            "result": None if result is None else Jsonb(result),
        },
    )
    return cur.fetchone() is not None


def fail(
    conn: psycopg.Connection,
    record_id: int,
    token: int | None,
    error_message: str,
    *,
    instance_id: str | None = None,
    error_details: str | None = None,
    policy: RetryPolicy = RetryPolicy(),
) -> str | None:
    """Retry the record later or, with retries spent, fail it. Returns its new status
    (``pending`` or ``failed``), or None when the claim was no longer ours."""
    row = _run(
        conn,
        query("fail"),
        {
            "id": record_id,
            "token": token,
            "instance_id": instance_id,
            "error_message": error_message,
            "error_details": error_details,
            "max_retries": policy.max_retries,
            "backoff_base": policy.backoff_base,
            "backoff_cap": policy.backoff_cap,
        },
    ).fetchone()
    return None if row is None else str(row[1])


def release(conn: psycopg.Connection, records: Sequence[Claimed]) -> list[int]:
    """Hand records back to the queue untouched; retries are not spent."""
    if not records:
        return []
    cur = _run(
        conn,
        query("release"),
        {"ids": [r.id for r in records], "tokens": [r.claim_token for r in records]},
    )
    return [row[0] for row in cur.fetchall()]


def heartbeat(conn: psycopg.Connection, records: Sequence[Claimed], lease_seconds: float) -> int:
    """Extend the lease of records still ours; returns how many were renewed. A record
    locked at this moment (being completed, or rechecked by another claim) is skipped:
    it is renewed on the next call if it is still ours."""
    if not records:
        return 0
    rows = _run_keeper(
        conn,
        query("heartbeat"),
        {
            "ids": [r.id for r in records],
            "tokens": [r.claim_token for r in records],
            "lease_seconds": lease_seconds,
        },
    )
    return len(rows)


def release_orphans(
    conn: psycopg.Connection,
    timeout_seconds: float | None = None,
    flow_name: str | None = None,
    *,
    max_abandons: int = DEFAULT_MAX_ABANDONS,
    reconnect_seconds: float = 0.0,
) -> list[int]:
    """Return records of dead claimers to the queue without spending a retry: those whose
    lease expired and, given ``timeout_seconds``, those claimed longer ago than that. A
    record abandoned ``max_abandons`` times is failed instead. Returns the ids touched.

    Expired leases count only once the server has been up ``reconnect_seconds`` (the
    lease keeper gives the lease length): after a database restart, live workers renew
    their leases before anyone takes them for dead. Rows another transaction holds are
    left for a later call: this never waits on them."""
    rows = _run_keeper(
        conn,
        query("release_orphans"),
        {
            "timeout_seconds": timeout_seconds,
            "flow_name": flow_name,
            "max_abandons": max_abandons,
            "reconnect_seconds": reconnect_seconds,
        },
    )
    return [row[0] for row in rows]


def release_instance(
    conn: psycopg.Connection,
    flow_name: str,
    instance_id: str,
    *,
    max_abandons: int = DEFAULT_MAX_ABANDONS,
) -> list[int]:
    """Return every record ``instance_id`` holds in ``flow_name`` at once, counted as
    abandoned: for an instance known to be gone (a restarted container, a deleted pod)."""
    rows = _run_keeper(
        conn,
        query("release_instance"),
        {"flow_name": flow_name, "instance_id": instance_id, "max_abandons": max_abandons},
    )
    return [row[0] for row in rows]


_COUNTS = (
    "pending_records",
    "processing_records",
    "completed_records",
    "failed_records",
    "other_records",
    "ready_records",
)


def stats(
    conn: psycopg.Connection, flow_name: str | None = None, *, completed: bool = True
) -> dict[str, dict[str, int]]:
    """Per-flow counts: ``{flow: {pending_records, processing_records, completed_records,
    failed_records, other_records, ready_records}}``; ``ready_records`` excludes those
    waiting out a delay; ``other_records`` are rows whose status is none of the four (a
    table adopted from the seed may hold them). ``completed=False`` skips counting
    history, which grows without bound, for callers that ask often and only about the
    live queue."""
    params = {"flow_name": flow_name}
    flows: dict[str, dict[str, int]] = {}
    with conn.cursor(row_factory=dict_row) as cur:
        for row in cur.execute(query("stats_by_flow"), params):
            name = row.pop("flow_name")
            counts = {k: int(v) for k, v in row.items()}
            counts["completed_records"] = counts.pop("completed_in_queue")
            flows[name] = counts
        if completed:
            for row in cur.execute(query("completed_by_flow"), params):
                counts = flows.setdefault(row["flow_name"], dict.fromkeys(_COUNTS, 0))
                counts["completed_records"] += int(row["completed_records"])
    return flows


# Records deleted per retention transaction: each holds its row locks and its share of
# the server for tens of milliseconds, so claims and completions never queue behind it.
CLEANUP_BATCH = 5_000
# After each retention transaction, wait this many times as long as it took: retention
# then uses at most a tenth of one server core, and claims keep their pace while it
# runs (bench/bench_scale.py measures both).
CLEANUP_PAUSE_FACTOR = 9.0


@dataclass(frozen=True)
class CleanupBatch:
    deleted: int
    seconds: float  # the transaction's duration, pause excluded


def cleanup_completed_batches(
    conn: psycopg.Connection,
    older_than_seconds: float,
    batch_size: int = CLEANUP_BATCH,
    pause_factor: float = CLEANUP_PAUSE_FACTOR,
) -> Iterator[CleanupBatch]:
    """Delete completed records older than ``older_than_seconds``, flow by flow, oldest
    first, in transactions of at most ``batch_size`` records (each commits on its own
    when ``conn`` is autocommit), pausing ``pause_factor`` times each one's duration
    after it; yields each batch as it commits."""
    row = conn.execute(
        query("cleanup_cutoff"), {"older_than_seconds": older_than_seconds}
    ).fetchone()
    assert row is not None
    cutoff = row[0]
    flows = [r[0] for r in conn.execute(query("history_flows")).fetchall()]
    for flow in flows:
        while True:
            started = time.monotonic()
            deleted = _run(
                conn,
                query("cleanup_completed_batch"),
                {"flow_name": flow, "cutoff": cutoff, "batch_size": batch_size},
            ).rowcount
            took = time.monotonic() - started
            yield CleanupBatch(deleted, took)
            if deleted < batch_size:
                break
            time.sleep(pause_factor * took)


def cleanup_completed(
    conn: psycopg.Connection,
    older_than_seconds: float,
    batch_size: int = CLEANUP_BATCH,
    pause_factor: float = CLEANUP_PAUSE_FACTOR,
) -> int:
    """Delete completed records older than ``older_than_seconds`` in short, paced
    transactions (``cleanup_completed_batches``); returns how many."""
    batches = cleanup_completed_batches(conn, older_than_seconds, batch_size, pause_factor)
    return sum(batch.deleted for batch in batches)


def requeue_failed(
    conn: psycopg.Connection, flow_name: str, ids: Sequence[int] | None = None
) -> list[int]:
    cur = _run(
        conn, query("requeue_failed"), {"flow_name": flow_name, "ids": list(ids) if ids else None}
    )
    requeued = [row[0] for row in cur.fetchall()]
    if requeued:
        conn.execute(query("notify"), {"flow_name": flow_name})
    return requeued


def performance(conn: psycopg.Connection, window_seconds: float) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return list(cur.execute(query("performance"), {"window_seconds": window_seconds}))


def failed_records(
    conn: psycopg.Connection, flow_name: str, limit: int = 100
) -> tuple[list[dict[str, Any]], int]:
    """The first ``limit`` failed records of a flow, by id, and how many failed in all."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = list(cur.execute(query("failed_records"), {"flow_name": flow_name, "limit": limit}))
    total = int(rows[0]["total_failed"]) if rows else 0
    for row in rows:
        del row["total_failed"]
    return rows, total


def processing_by_instance(
    conn: psycopg.Connection, flow_name: str | None = None
) -> list[dict[str, Any]]:
    """Records in flight per flow and instance id, with how many of their leases ran out."""
    with conn.cursor(row_factory=dict_row) as cur:
        return list(cur.execute(query("processing_by_instance"), {"flow_name": flow_name}))


def records_by_id(conn: psycopg.Connection, ids: Sequence[int]) -> dict[int, tuple[str, str]]:
    """``{id: (flow_name, status)}`` for those of ``ids`` that exist, queue or history."""
    rows = conn.execute(query("records_by_id"), {"ids": list(ids)}).fetchall()
    return {int(row[0]): (str(row[1]), str(row[2])) for row in rows}


def release_tokens(conn: psycopg.Connection, pairs: Sequence[tuple[int, int]]) -> list[int]:
    """``release`` for ``(id, claim_token)`` pairs: hand back records still ours."""
    if not pairs:
        return []
    cur = conn.execute(
        query("release"), {"ids": [p[0] for p in pairs], "tokens": [p[1] for p in pairs]}
    )
    return [row[0] for row in cur.fetchall()]


def release_instance_everywhere(conn: psycopg.Connection, instance_id: str) -> list[int]:
    """Hand back every record ``instance_id`` holds in any flow, whatever its lease, no
    retry spent (``flowfleet cleanup --instance``); returns the ids."""
    cur = conn.execute(query("release_instance_everywhere"), {"instance_id": instance_id})
    return [row[0] for row in cur.fetchall()]


def take_depth_reporting(conn: psycopg.Connection, flow_name: str) -> bool:
    """Whether this session now reports the flow's queue depth (ask once per session:
    the lock is re-entrant, so a second yes would only stack it)."""
    row = conn.execute(query("take_depth_reporting"), {"flow_name": flow_name}).fetchone()
    return bool(row and row[0])


@dataclass(frozen=True)
class FlowDepth:
    """One flow's live queue, as the operator scales on it."""

    pending: int
    ready: int
    processing: int
    failed: int
    busy_instances: int
    completed_recently: int
    # Instances whose completions make up completed_recently: the producers of the rate.
    completing_instances: int


def depth_of_flows(
    conn: psycopg.Connection, flow_names: Sequence[str], window_seconds: float
) -> dict[str, FlowDepth]:
    """Depth of every named flow in one statement (flows with no records read as zero);
    ``completed_recently`` counts completions within the last ``window_seconds``."""
    rows = conn.execute(
        query("depth_of_flows"),
        {"flow_names": list(flow_names), "window_seconds": window_seconds},
    ).fetchall()
    return {row[0]: FlowDepth(*(int(v) for v in row[1:])) for row in rows}


def delete_flow(conn: psycopg.Connection, flow_name: str) -> tuple[int, int]:
    """Delete every record of ``flow_name``, live queue then history, whatever its status;
    returns ``(live, finished)`` counts. Run it in a transaction to delete both or neither."""
    live = conn.execute(query("delete_flow_queue"), {"flow_name": flow_name}).rowcount
    finished = conn.execute(query("delete_flow_history"), {"flow_name": flow_name}).rowcount
    return live, finished

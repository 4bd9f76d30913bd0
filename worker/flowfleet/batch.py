"""Running one claimed batch through the user's processor, one record at a time.

Shared by both runners. A record that raises is retried or failed on its own; the rest of
the batch goes on. Completions of plain records are left to the caller, which commits
them together with its next claim; a processor that takes ``conn`` gets the transaction
in which its record's completion commits, so its writes take effect exactly once.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from flowfleet import queue
from flowfleet.entrypoint import Processor
from flowfleet.redaction import redact

log = logging.getLogger("flowfleet.batch")


class _Fenced(Exception):
    """The record's claim was taken back: roll its transaction back."""


# A processor's transaction that lost a deadlock or serialization conflict is rolled back
# whole, its writes with it; it runs again this many times before it counts as an error.
TRANSACTION_ATTEMPTS = 3
MAX_ERROR_MESSAGE = 2000
MAX_ERROR_DETAILS = 8000


def storable(text: str) -> str:
    """``text`` as PostgreSQL can store it: a NUL byte and a lone surrogate (which UTF-8
    cannot encode) are written out as escapes, so the message still says what was there."""
    if "\0" in text:
        text = text.replace("\0", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def describe_error(exc: BaseException) -> str:
    """``Type: message`` of whatever a processor raised, even when its ``__str__`` fails."""
    name = type(exc).__name__
    try:
        text = str(exc)
    except BaseException as broken:  # a __str__ that raises must not lose the record
        text = f"<str() of the exception raised {type(broken).__name__}>"
    return storable(redact(f"{name}: {text}" if text else name))[:MAX_ERROR_MESSAGE]


def _details(exc: BaseException) -> str:
    try:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except BaseException:
        text = describe_error(exc)
    return storable(redact(text))[-MAX_ERROR_DETAILS:]


@dataclass
class BatchOutcome:
    claimed: int = 0
    completed: list[queue.Claimed] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)
    committed: int = 0  # completed inside the processor's own transaction
    retried: int = 0
    failed: int = 0
    fenced: int = 0
    unprocessed: list[queue.Claimed] = field(default_factory=list)
    # When the record now running started (monotonic), for the stuck-record check.
    current_started: float | None = None
    # Set when the processor raised a BaseException that is not an Exception (SystemExit,
    # KeyboardInterrupt, ...): its record is failed, the records after it are left in
    # ``unprocessed``, and the caller settles the batch and then raises it.
    fatal: BaseException | None = None

    def counts(self) -> dict[str, int]:
        return {
            "claimed": self.claimed,
            "completed": len(self.completed) + self.committed,
            "retried": self.retried,
            "failed": self.failed,
            "fenced": self.fenced,
            "released": len(self.unprocessed),
        }


def run_batch(
    conn: psycopg.Connection,
    records: Sequence[queue.Claimed],
    processor: Processor,
    policy: queue.RetryPolicy,
    *,
    call: Callable[..., Any] | None = None,
    should_continue: Callable[[], bool] = lambda: True,
    instance_id: str | None = None,
    outcome: BatchOutcome | None = None,
) -> BatchOutcome:
    """Process ``records``; stop starting new ones once ``should_continue()`` is false and
    report those as ``unprocessed`` for the caller to release. A caller that passes
    ``outcome`` can read it while the batch runs (results land before their record)."""
    invoke = call or processor.fn
    outcome = outcome if outcome is not None else BatchOutcome()
    outcome.claimed = len(records)
    for index, record in enumerate(records):
        if not should_continue():
            outcome.unprocessed.extend(records[index:])
            break
        outcome.current_started = time.monotonic()
        try:
            if processor.takes_conn:
                _run_in_transaction(conn, record, invoke)
                outcome.committed += 1
            else:
                result = invoke(record.payload)
                if result is not None:
                    # Checked now, so a result jsonb cannot store fails its own record
                    # instead of the batch's completion.
                    queue.to_json(result, "the processor's result")
                outcome.results.append(result)
                outcome.completed.append(record)
        except _Fenced:
            outcome.fenced += 1
        except Exception as exc:
            _fail(conn, record, exc, policy, instance_id, outcome)
        except BaseException as exc:
            # Not the record's error alone: the processor asked the process to stop (or
            # something like it). Its record is failed so a record that exits every
            # worker ends up failed, not running forever; the caller settles the rest.
            _fail(conn, record, exc, policy, instance_id, outcome)
            outcome.fatal = exc
            outcome.unprocessed.extend(records[index + 1 :])
            break
    return outcome


def _run_in_transaction(
    conn: psycopg.Connection, record: queue.Claimed, invoke: Callable[..., Any]
) -> None:
    """The processor's writes and its record's completion, committed together."""
    for attempt in range(1, TRANSACTION_ATTEMPTS + 1):
        try:
            with conn.transaction():
                result = invoke(record.payload, conn=conn)
                if result is not None:
                    queue.to_json(result, "the processor's result")
                if not queue.complete(conn, [record], [result]):
                    raise _Fenced
            return
        except psycopg.OperationalError as exc:
            if not queue.is_retryable(exc) or attempt == TRANSACTION_ATTEMPTS or conn.broken:
                raise
            log.info(
                "record %s: transaction rolled back by the server; running it again", record.id
            )


def _fail(
    conn: psycopg.Connection,
    record: queue.Claimed,
    exc: BaseException,
    policy: queue.RetryPolicy,
    instance_id: str | None,
    outcome: BatchOutcome,
) -> None:
    # Stored, so redacted (a processor's error may quote a connection string) and made
    # storable (it may hold a NUL or a lone surrogate).
    message = describe_error(exc)
    status = queue.fail(
        conn,
        record.id,
        record.claim_token,
        message,
        error_details=_details(exc),
        policy=policy,
        instance_id=instance_id,
    )
    if status == "pending":
        outcome.retried += 1
        log_retry(record, policy, message)
    elif status == "failed":
        outcome.failed += 1
        log.warning(
            "record %s failed for good: %s",
            record.id,
            message,
            extra={"record_id": record.id, "attempt": record.retry_count + 1},
        )
    else:
        outcome.fenced += 1


def finish(conn: psycopg.Connection, outcome: BatchOutcome) -> list[int]:
    """Commit the batch's pending completions (with results when any were returned)."""
    if not outcome.completed:
        return []
    results = outcome.results if any(r is not None for r in outcome.results) else None
    return queue.complete(conn, outcome.completed, results)


def log_retry(record: queue.Claimed, policy: queue.RetryPolicy, message: str) -> None:
    """One line per retry, with what an operator filters on as fields: the record, which
    attempt failed, and the backoff before it runs again (the queue takes a random part,
    up to half, off it, so a burst of failures does not retry together)."""
    attempt = record.retry_count + 1
    delay = min(policy.backoff_cap, policy.backoff_base * 2 ** min(record.retry_count, 60))
    log.info(
        "record %s: attempt %d of %d failed (%s); retrying in at most %.3gs",
        record.id,
        attempt,
        policy.max_retries + 1,
        message,
        delay,
        extra={"record_id": record.id, "attempt": attempt, "delay": delay},
    )

"""The worker process's life: waiting for the database at start, stopping on SIGTERM or
SIGINT with a grace period, and settling what the claim loops still hold at its end."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import psycopg

from flowfleet import queue
from flowfleet.backoff import Backoff
from flowfleet.errors import DatabaseUnavailableError, SchemaError
from flowfleet.inflight import InFlight
from flowfleet.migrate import current_version
from flowfleet.sql import latest_version
from flowfleet.wakeups import WakeUps

log = logging.getLogger("flowfleet.worker")


class Shutdown:
    """A stop request and its grace period: records of a claimed batch still start until
    a margin before the grace period ends."""

    def __init__(self, grace_seconds: float, wakeups: WakeUps) -> None:
        self.grace_seconds = grace_seconds
        self.wakeups = wakeups
        self.requested = threading.Event()
        self.hard_stop_at: float | None = None

    def request(self, why: str) -> None:
        if not self.requested.is_set():
            log.info("stopping: %s", why)
            self.hard_stop_at = time.monotonic() + self.grace_seconds
            self.requested.set()
            self.wakeups.bump()

    def accepting_records(self, now: float | None = None) -> bool:
        """False once a record started now could not finish within the grace period."""
        if self.hard_stop_at is None:
            return True
        margin = min(2.0, 0.2 * self.grace_seconds)
        return (time.monotonic() if now is None else now) < self.hard_stop_at - margin

    def seconds_left(self) -> float:
        if self.hard_stop_at is None:
            return float("inf")
        return max(0.0, self.hard_stop_at - time.monotonic())


def stop_on_signals(shutdown: Shutdown) -> None:
    """SIGTERM (the kubelet) and SIGINT (a terminal) request a graceful stop."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: shutdown.request(signal.Signals(signum).name))


def check_schema(conn: psycopg.Connection) -> int:
    version = current_version(conn)
    needed = latest_version()
    if version < needed:
        state = "has no flowfleet schema" if version == 0 else f"is at schema version {version}"
        raise SchemaError(
            f"the queue database {state}; this worker needs version {needed}: "
            "run `flowfleet migrate`"
        )
    return version


Connection = Callable[..., AbstractContextManager[psycopg.Connection]]


def wait_for_database(connection: Connection, stopping: threading.Event) -> bool:
    """Until the queue database answers with a current schema (True) or a stop is
    requested (False). An unreachable database is waited for, not crashed on: a pod that
    exits would only be restarted into the same outage. /readyz says why meanwhile. A
    missing schema raises SchemaError: waiting would not fix it."""
    backoff = Backoff(first=1.0)
    while not stopping.is_set():
        try:
            with connection(timeout=5.0) as conn:
                check_schema(conn)
            return True
        except DatabaseUnavailableError as exc:
            delay = backoff.next_delay()
            log.warning("%s; retrying in %.0fs", exc, delay)
            stopping.wait(delay)
    return False


def release_previous_claims(
    connection: Connection, flow_name: str, instance_id: str, max_abandons: int
) -> None:
    """Return at once what this instance id still holds from before this process: its
    container restarted in the same pod (after an OOM kill, say), and the process that
    claimed those records is gone. Waiting for their leases would only delay them."""
    try:
        with connection(timeout=5.0) as conn:
            returned = queue.release_instance(
                conn, flow_name, instance_id, max_abandons=max_abandons
            )
    except DatabaseUnavailableError as exc:
        log.warning("could not return earlier claims (%s); their leases will", exc)
        return
    if returned:
        log.warning(
            "returned %d records that %s held before this process started",
            len(returned),
            instance_id,
        )


def settle_unfinished(
    connection: Connection, unfinished: Sequence[InFlight]
) -> tuple[int, int] | None:
    """After the grace period: complete the records the unfinished loops have processed
    and release the others. Returns (completed, released), or None when the database is
    out of reach (then the leases settle them)."""
    processed: list[queue.Claimed] = []
    results: list[Any] = []
    rest: list[queue.Claimed] = []
    for held in unfinished:
        split = held.unsettled()
        processed += split.processed
        results += split.results
        rest += split.unprocessed
    if not processed and not rest:
        return 0, 0
    # The abandoned threads may still answer; the claim tokens make their late
    # completions and releases no-ops.
    try:
        with connection(timeout=5.0) as conn:
            completed = queue.complete(
                conn, processed, results if any(r is not None for r in results) else None
            )
            released = queue.release(conn, rest)
    except DatabaseUnavailableError as exc:
        log.warning("could not settle in-flight records (%s); their leases will", exc)
        return None
    log.warning(
        "grace period over: completed %d processed records, released %d others",
        len(completed),
        len(released),
    )
    return len(completed), len(released)

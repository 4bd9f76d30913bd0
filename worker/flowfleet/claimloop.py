"""One claim loop: claim a batch, hand it to the runner, complete it together with the
next claim, and wait for a wake-up when the queue is empty.

A loop runs on its own thread with its own connection. It depends on small explicit
parts only: its settings, a database to connect to, a runner, the wake-ups, the stop
event and the worker's metrics.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import psycopg

from flowfleet import queue
from flowfleet.backoff import Backoff
from flowfleet.batch import BatchOutcome, finish
from flowfleet.errors import DatabaseUnavailableError
from flowfleet.inflight import InFlight
from flowfleet.metrics import WorkerMetrics
from flowfleet.wakeups import WakeUps

log = logging.getLogger("flowfleet.worker")


@dataclass(frozen=True)
class ClaimSettings:
    flow_name: str
    instance_id: str
    batch_size: int
    lease_seconds: float
    poll_seconds: float
    exit_when_empty: bool = False


class QueueDatabase(Protocol):
    """The parts of ``DatabaseManager`` a claim loop uses."""

    def connect(self) -> psycopg.Connection: ...

    def connection(self, timeout: float = ...) -> AbstractContextManager[psycopg.Connection]: ...

    def unavailable(self, cause: object) -> DatabaseUnavailableError: ...


# Runs one batch on the loop's connection, filling ``progress`` as it goes; returns the
# outcome (``progress`` itself).
RunBatch = Callable[[psycopg.Connection, list[queue.Claimed], BatchOutcome], BatchOutcome]


class BatchSequence(Protocol):
    """What a runner may ask of the claim loop that hands it a batch."""

    def process_until_idle(
        self,
        first_batch: list[queue.Claimed],
        run_batch: RunBatch,
        deadline: float | None = None,
    ) -> int: ...


class Runner(Protocol):
    """Runs the batches of a busy stretch, starting with ``first_batch``, by calling
    ``loop.process_until_idle`` with its own way of running one batch."""

    def run_busy_stretch(self, first_batch: list[queue.Claimed], loop: BatchSequence) -> None: ...


class ClaimLoop:
    def __init__(
        self,
        index: int,
        settings: ClaimSettings,
        db: QueueDatabase,
        runner: Runner,
        wakeups: WakeUps,
        stopping: threading.Event,
        on_queue_empty: Callable[[], None],
        metrics: WorkerMetrics,
    ) -> None:
        self.index = index
        self.settings = settings
        self.db = db
        self.runner = runner
        self.wakeups = wakeups
        self.stopping = stopping
        self.on_queue_empty = on_queue_empty
        self.metrics = metrics
        self.in_flight = InFlight()
        self.conn: psycopg.Connection | None = None
        self.thread = threading.Thread(target=self.run, name=f"claim-{index}", daemon=True)

    # -- the loop -------------------------------------------------------------------

    def run(self) -> None:
        backoff = Backoff()
        while not self.stopping.is_set():
            try:
                if self.conn is None or self.conn.closed:
                    self.conn = self.db.connect()
                seen = self.wakeups.generation
                batch = self._claim_batch()
                self._hold_in_flight(batch)
                if batch:
                    self.runner.run_busy_stretch(batch, self)
                    backoff.reset()  # a clean pass (a batch run, an empty claim) ends backoff
                    continue
                backoff.reset()
                if self.settings.exit_when_empty and self._queue_is_empty(self.conn):
                    self.on_queue_empty()
                    break
                self.wakeups.wait(seen, self.settings.poll_seconds, self.stopping)
            except (psycopg.OperationalError, DatabaseUnavailableError) as exc:
                delay = backoff.next_delay()
                log.warning(
                    "database connection lost (%s); retrying in %.1fs",
                    self.db.unavailable(exc),
                    delay,
                )
                self._hand_back_batch()
                self.stopping.wait(delay)
            except Exception:
                # A Prefect API outage or a bug must not kill the loop for good: log it,
                # hand the batch back, and try again after a pause.
                delay = backoff.next_delay()
                log.exception("claim loop error; retrying in %.1fs", delay)
                self._hand_back_batch()
                self.stopping.wait(delay)
        self._close_connection()

    def process_until_idle(
        self,
        first_batch: list[queue.Claimed],
        run_batch: RunBatch,
        deadline: float | None = None,
    ) -> int:
        """Run batches back to back while work keeps coming, committing each batch's
        completions with the next claim; stop at ``deadline`` or on shutdown. Returns
        how many batches ran."""
        assert self.conn is not None
        conn = self.conn
        s = self.settings
        batch, ran = first_batch, 0
        while batch:
            started = time.perf_counter()
            progress = BatchOutcome()
            self.in_flight.track(progress)
            outcome = run_batch(conn, batch, progress)
            self.metrics.batch_seconds.observe(time.perf_counter() - started)
            ran += 1
            if outcome.unprocessed:
                queue.release(conn, outcome.unprocessed)
            keep_going = not self.stopping.is_set() and (
                deadline is None or time.monotonic() < deadline
            )
            wants_results = any(r is not None for r in outcome.results)
            if keep_going and not wants_results:
                following = queue.complete_and_claim(
                    conn,
                    outcome.completed,
                    s.flow_name,
                    s.instance_id,
                    s.batch_size,
                    s.lease_seconds,
                )
            else:
                finish(conn, outcome)
                following = self._claim_batch() if keep_going else []
            self._count_outcome(outcome)
            self._drop_in_flight()
            self._hold_in_flight(following)
            batch = following
        return ran

    # -- claims and what the loop holds ----------------------------------------------

    def _claim_batch(self) -> list[queue.Claimed]:
        assert self.conn is not None
        s = self.settings
        return queue.claim(self.conn, s.flow_name, s.instance_id, s.batch_size, s.lease_seconds)

    def _hold_in_flight(self, batch: list[queue.Claimed]) -> None:
        """Hold a fresh claim in flight: from now on the lease keeper renews it."""
        if batch:
            self.metrics.count_claims(batch)
            self.in_flight.hold(batch)
            self.metrics.in_flight.inc(len(batch))

    def _drop_in_flight(self) -> None:
        self.metrics.in_flight.dec(self.in_flight.clear())

    def _count_outcome(self, outcome: BatchOutcome) -> None:
        m = self.metrics
        m.completed.inc(len(outcome.completed) + outcome.committed)
        m.retried.inc(outcome.retried)
        m.failed.inc(outcome.failed)
        m.fenced.inc(outcome.fenced)
        m.count_released([r.id for r in outcome.unprocessed])

    def _hand_back_batch(self) -> None:
        """Stop renewing the batch in hand and try to hand it back at once; if the
        database is out of reach, its leases run out and any worker returns it."""
        records = self.in_flight.records()
        self._drop_in_flight()
        self._close_connection()
        if records:
            try:
                with self.db.connection(timeout=2.0) as conn:
                    self.metrics.count_released(queue.release(conn, records))
            except DatabaseUnavailableError:
                pass

    def _close_connection(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except psycopg.Error:
                pass
        self.conn = None

    def _queue_is_empty(self, conn: psycopg.Connection) -> bool:
        flow = self.settings.flow_name
        counts = queue.stats(conn, flow, completed=False).get(flow, {})
        return counts.get("pending_records", 0) == 0 and counts.get("processing_records", 0) == 0

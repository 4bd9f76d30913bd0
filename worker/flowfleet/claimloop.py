"""One claim loop: claim a batch, hand it to the runner, complete it together with the
next claim, and wait for a wake-up when the queue is empty.

A loop runs on its own thread with its own connection. It depends on small explicit
parts only: its settings, a database to connect to, a runner, the wake-ups, the stop
event and the worker's metrics.

A pass that fails (a lost connection, a statement error, a bug) does not drop the batch in
hand: the records it processed are completed and the rest handed back, at once if the
database answers, else as soon as it does (the keeper renews their leases meanwhile). A
BaseException (``sys.exit()`` in a processor) ends the loop, and the worker stops with a
non-zero exit.
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
from flowfleet.batch import BatchOutcome, describe_error, finish
from flowfleet.errors import DatabaseUnavailableError
from flowfleet.inflight import InFlight
from flowfleet.metrics import WorkerMetrics
from flowfleet.wakeups import WakeUps

log = logging.getLogger("flowfleet.worker")


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(frozen=True)
class ClaimSettings:
    flow_name: str
    instance_id: str
    batch_size: int
    lease_seconds: float
    poll_seconds: float
    exit_when_empty: bool = False
    # A bound on the payload bytes of one batch (None: batch_size alone bounds it).
    max_batch_bytes: int | None = None


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
        on_fatal: Callable[[str], None] = lambda why: None,
    ) -> None:
        self.index = index
        self.settings = settings
        self.db = db
        self.runner = runner
        self.wakeups = wakeups
        self.stopping = stopping
        self.on_queue_empty = on_queue_empty
        # Called when the loop ends for good (a BaseException): the worker should stop.
        self.on_fatal = on_fatal
        self.metrics = metrics
        self.in_flight = InFlight()
        self.conn: psycopg.Connection | None = None
        self.thread = threading.Thread(target=self.run, name=f"claim-{index}", daemon=True)

    # -- the loop -------------------------------------------------------------------

    def run(self) -> None:
        backoff = Backoff()
        try:
            while not self.stopping.is_set():
                try:
                    if self.conn is None or self.conn.closed:
                        self.conn = self.db.connect()
                    if self.in_flight.records():
                        # Left by a pass that failed: settled before anything new is claimed.
                        self._settle(self.conn)
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
                    if self._connection_lost(exc):
                        log.warning(
                            "database connection lost (%s); retrying in %.1fs",
                            self.db.unavailable(exc),
                            delay,
                        )
                        self._close_connection()
                    else:
                        # A deadlock or serialization failure that outlasted the queue's
                        # own retries, a lock or statement timeout: the connection is fine.
                        log.warning(
                            "statement failed (%s); retrying in %.1fs", one_line(exc), delay
                        )
                    self._settle_now()
                    self.stopping.wait(delay)
                except Exception:
                    # A Prefect API outage or a bug must not kill the loop for good: log it,
                    # settle the batch, and try again after a pause.
                    delay = backoff.next_delay()
                    log.exception("claim loop error; retrying in %.1fs", delay)
                    self._settle_now()
                    self.stopping.wait(delay)
        except BaseException as exc:
            # SystemExit and its kind, from a processor (its record is already failed) or
            # elsewhere: this loop ends, and so does the worker, with a non-zero exit.
            log.critical("claim loop %d ended by %s", self.index, describe_error(exc))
            self.on_fatal(f"claim loop {self.index} ended by {type(exc).__name__}")
        finally:
            self._settle_now()
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
            if outcome.fatal is not None:
                finish(conn, outcome)
                self._count_outcome(outcome)
                self._drop_in_flight()
                raise outcome.fatal
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
                    max_batch_bytes=s.max_batch_bytes,
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
        return queue.claim(
            self.conn,
            s.flow_name,
            s.instance_id,
            s.batch_size,
            s.lease_seconds,
            max_batch_bytes=s.max_batch_bytes,
        )

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

    def _connection_lost(self, exc: BaseException) -> bool:
        if isinstance(exc, DatabaseUnavailableError):
            return True
        return self.conn is None or self.conn.broken or self.conn.closed

    def _settle(self, conn: psycopg.Connection) -> None:
        """Settle the batch in hand after a failed pass: complete the records it processed
        (those still ours: the claim tokens tell) and hand back the rest. Finished work is
        never thrown away, so a lost connection or a database restart re-runs nothing but
        a record whose own statement was cut."""
        split = self.in_flight.unsettled()
        results = split.results if any(r is not None for r in split.results) else None
        completed = queue.complete(conn, split.processed, results)
        released = queue.release(conn, split.unprocessed)
        self._drop_in_flight()
        if completed or released:
            log.info(
                "settled the interrupted batch: completed %d processed records, released %d",
                len(completed),
                len(released),
            )
        self.metrics.completed.inc(len(completed))
        self.metrics.count_released(released)

    def _settle_now(self) -> None:
        """Settle the batch in hand on a connection of the pool, if the database answers;
        if it does not, the batch stays in hand (the keeper renews its leases) for the next
        pass, or the end of the grace period, to settle."""
        if not self.in_flight.records():
            return
        try:
            with self.db.connection(timeout=2.0) as conn:
                self._settle(conn)
        except (psycopg.Error, DatabaseUnavailableError) as exc:
            log.info("batch in hand kept for the next pass: %s", one_line(exc))

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

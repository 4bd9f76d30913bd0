"""The worker process: claim loops, lease heartbeats, wake-ups, signals, health.

Threads of one process:
- ``concurrency`` claim loops, each with its own connection: claim a batch, run it,
  complete it together with the next claim;
- a listener (LISTEN ``flowfleet_queue``) that wakes idle loops the moment work arrives;
- a keeper that renews the leases of in-flight records and returns dead claimers' records;
- an HTTP server for ``/healthz``, ``/readyz`` and ``/metrics``.
The main thread waits for SIGTERM or SIGINT, then stops claiming, lets in-flight records
finish within the grace period, releases what is left and exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from flowfleet import queue
from flowfleet.batch import BatchOutcome, finish, run_batch
from flowfleet.database import DatabaseManager
from flowfleet.entrypoint import Processor
from flowfleet.errors import DatabaseUnavailableError, SchemaError
from flowfleet.metrics import WorkerMetrics
from flowfleet.migrate import current_version
from flowfleet.settings import WorkerSettings
from flowfleet.sql import latest_version

log = logging.getLogger("flowfleet.worker")

RECONNECT_MAX_SECONDS = 30.0


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


class Wake:
    """A generation counter: a loop notes the generation before it claims, so a wake-up
    that lands between an empty claim and the wait is not lost."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.generation = 0

    def bump(self) -> None:
        with self._cond:
            self.generation += 1
            self._cond.notify_all()

    def wait(self, seen: int, timeout: float, stop: threading.Event) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.generation != seen or stop.is_set(), timeout)


class ClaimLoop:
    """One claim loop on its own thread and connection."""

    def __init__(self, worker: Worker, index: int) -> None:
        self.worker = worker
        self.index = index
        self.conn: psycopg.Connection | None = None
        self.lock = threading.Lock()
        self.in_flight: list[queue.Claimed] = []
        # The batch being processed, filled record by record: at the end of the grace
        # period the main thread completes what it holds and releases only the rest.
        self.live: BatchOutcome | None = None
        self.thread = threading.Thread(target=self.run, name=f"claim-{index}", daemon=True)
        self.batches = 0
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self.batch_in_hand: list[queue.Claimed] = []

    # -- state shared with the keeper and the main thread ---------------------------

    def _set_in_flight(self, records: list[queue.Claimed]) -> None:
        with self.lock:
            self.in_flight = records
        self.worker.metrics.in_flight.inc(len(records))

    def _clear_in_flight(self) -> None:
        with self.lock:
            count = len(self.in_flight)
            self.in_flight = []
            self.live = None
        self.worker.metrics.in_flight.dec(count)

    def snapshot(self) -> list[queue.Claimed]:
        with self.lock:
            return list(self.in_flight)

    def stuck_for(self) -> float:
        """Seconds the current record has run past the record timeout (0: not stuck)."""
        limit = self.worker.settings.record_timeout_seconds
        with self.lock:
            started = self.live.current_started if self.live is not None else None
        if not limit or started is None:
            return 0.0
        return max(0.0, time.monotonic() - started - limit)

    def leftovers(self) -> tuple[list[queue.Claimed], list[Any], list[queue.Claimed]]:
        """(processed but not yet completed, their results, the rest) of the batch."""
        with self.lock:
            in_flight, live = list(self.in_flight), self.live
        if live is None:
            return [], [], in_flight
        # Results are appended before their record, so they are never fewer.
        done = list(live.completed)
        results = live.results[: len(done)]
        finished = {r.id for r in done}
        return done, results, [r for r in in_flight if r.id not in finished]

    # -- the loop -------------------------------------------------------------------

    def run(self) -> None:
        worker = self.worker
        delay = 0.5
        while not worker.stopping.is_set():
            try:
                if self.conn is None or self.conn.closed:
                    self.conn = worker.db.connect()
                seen = worker.wake.generation
                batch = self._claim()
                if batch:
                    worker.runner(self, batch)
                    delay = 0.5  # a clean pass (a batch run, an empty claim) ends backoff
                    continue
                delay = 0.5
                if worker.settings.exit_when_empty and worker.queue_is_empty(self.conn):
                    worker.request_stop("queue empty")
                    break
                worker.wake.wait(seen, worker.settings.poll_seconds, worker.stopping)
            except (psycopg.OperationalError, DatabaseUnavailableError) as exc:
                log.warning(
                    "database connection lost (%s); retrying in %.1fs",
                    worker.db.unavailable(exc),
                    delay,
                )
                self._abandon_batch()
                worker.stopping.wait(delay)
                delay = min(delay * 2, RECONNECT_MAX_SECONDS)
            except Exception:
                # A Prefect API outage or a bug must not kill the loop for good: log it,
                # hand the batch back, and try again after a pause.
                log.exception("claim loop error; retrying in %.1fs", delay)
                self._abandon_batch()
                worker.stopping.wait(delay)
                delay = min(delay * 2, RECONNECT_MAX_SECONDS)
        self._drop_connection()

    def _abandon_batch(self) -> None:
        """Stop renewing the batch in hand and try to hand it back at once; if the
        database is out of reach, its leases run out and any worker returns it."""
        records = self.snapshot()
        self._clear_in_flight()
        self._drop_connection()
        if records:
            try:
                with self.worker.db.connection(timeout=2.0) as conn:
                    queue.release(conn, records)
            except DatabaseUnavailableError:
                pass

    def _drop_connection(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except psycopg.Error:
                pass
        self.conn = None

    def _claim(self) -> list[queue.Claimed]:
        batch = self._claim_raw()
        self._claimed(batch)
        return batch

    def _claimed(self, batch: list[queue.Claimed]) -> None:
        if batch:
            self.worker.metrics.claimed.inc(len(batch))
            self._set_in_flight(batch)

    def process_until_idle(
        self,
        batch: list[queue.Claimed],
        run: Callable[[list[queue.Claimed], BatchOutcome], BatchOutcome],
        deadline: float | None = None,
    ) -> None:
        """Run batches back to back while work keeps coming, committing each batch's
        completions with the next claim; stop at ``deadline`` or on shutdown."""
        assert self.conn is not None
        s = self.worker.settings
        while batch:
            started = time.perf_counter()
            live = BatchOutcome()
            with self.lock:
                self.live = live
            outcome = run(batch, live)
            self.worker.metrics.batch_seconds.observe(time.perf_counter() - started)
            self.batches += 1
            if outcome.unprocessed:
                queue.release(self.conn, outcome.unprocessed)
            keep_going = not self.worker.stopping.is_set() and (
                deadline is None or time.monotonic() < deadline
            )
            wants_results = any(r is not None for r in outcome.results)
            if keep_going and not wants_results:
                nxt = queue.complete_and_claim(
                    self.conn,
                    outcome.completed,
                    s.flow_name,
                    self.worker.instance_id,
                    s.batch_size,
                    s.lease_seconds,
                )
            else:
                finish(self.conn, outcome)
                nxt = self._claim_raw() if keep_going else []
            self._record(outcome)
            self._clear_in_flight()
            self._claimed(nxt)
            batch = nxt

    def _claim_raw(self) -> list[queue.Claimed]:
        assert self.conn is not None
        s = self.worker.settings
        return queue.claim(
            self.conn, s.flow_name, self.worker.instance_id, s.batch_size, s.lease_seconds
        )

    def _record(self, outcome: BatchOutcome) -> None:
        m = self.worker.metrics
        m.completed.inc(len(outcome.completed) + outcome.committed)
        m.retried.inc(outcome.retried)
        m.failed.inc(outcome.failed)
        m.fenced.inc(outcome.fenced)
        m.released.inc(len(outcome.unprocessed))

    def run_plain(self, batch: list[queue.Claimed], outcome: BatchOutcome) -> BatchOutcome:
        assert self.conn is not None
        w = self.worker
        return run_batch(
            self.conn,
            batch,
            w.processor,
            w.policy,
            should_continue=w.accepting_records,
            instance_id=w.instance_id,
            outcome=outcome,
        )

    def event_loop(self) -> asyncio.AbstractEventLoop:
        # One loop per thread for the life of the thread: Prefect's async flows reuse it.
        if self._event_loop is None:
            self._event_loop = asyncio.new_event_loop()
        return self._event_loop


def plain_runner(loop: ClaimLoop, batch: list[queue.Claimed]) -> None:
    loop.process_until_idle(batch, loop.run_plain)


def make_prefect_runner(flow_name: str) -> Callable[[ClaimLoop, list[queue.Claimed]], None]:
    """A flow run per busy stretch (up to ``flow_run_seconds``), a task run per batch:
    idle workers create no runs, busy ones pay Prefect's overhead per batch, not per
    record."""
    from prefect import flow

    from flowfleet.flow_template import process_records

    current = threading.local()  # the ClaimLoop of this thread, kept out of run parameters

    @flow(name=flow_name, persist_result=False, validate_parameters=False)
    async def worker_flow(instance_id: str, first_batch: list[int]) -> int:
        # The parameters only label the run in Prefect: who ran it, which records began it.
        claim_loop: ClaimLoop = current.loop
        w = claim_loop.worker

        def run(batch: list[queue.Claimed], outcome: BatchOutcome) -> BatchOutcome:
            context: dict[str, Any] = {
                "conn": claim_loop.conn,
                "records": batch,
                "processor": w.processor,
                "policy": w.policy,
                "should_continue": w.accepting_records,
                "instance_id": w.instance_id,
                "outcome": outcome,
            }
            process_records([r.id for r in batch], context)
            return outcome

        before = claim_loop.batches
        claim_loop.process_until_idle(
            claim_loop.batch_in_hand,
            run,
            deadline=time.monotonic() + w.settings.flow_run_seconds,
        )
        return claim_loop.batches - before

    def runner(loop: ClaimLoop, batch: list[queue.Claimed]) -> None:
        loop.batch_in_hand = batch
        current.loop = loop
        loop.event_loop().run_until_complete(
            worker_flow(loop.worker.instance_id, [r.id for r in batch])
        )

    return runner


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        db: DatabaseManager,
        processor: Processor,
        instance_id: str,
    ) -> None:
        self.settings = settings
        self.db = db
        self.processor = processor
        self.instance_id = instance_id
        self.policy = queue.RetryPolicy(
            max_retries=settings.max_retries,
            backoff_base=settings.retry_backoff_seconds,
            backoff_cap=settings.retry_backoff_max_seconds,
        )
        self.metrics = WorkerMetrics(settings.flow_name)
        self.stopping = threading.Event()
        self.finished = threading.Event()
        self.started = threading.Event()
        self.hard_stop_at: float | None = None
        self.wake = Wake()
        self.loops = [ClaimLoop(self, i) for i in range(settings.concurrency)]
        self.keeper_tick = time.monotonic()
        self.runner: Callable[[ClaimLoop, list[queue.Claimed]], None] = (
            plain_runner if settings.runner == "plain" else make_prefect_runner(settings.flow_name)
        )

    # -- control --------------------------------------------------------------------

    def request_stop(self, why: str) -> None:
        if not self.stopping.is_set():
            log.info("stopping: %s", why)
            self.hard_stop_at = time.monotonic() + self.settings.grace_seconds
            self.stopping.set()
            self.wake.bump()

    def accepting_records(self) -> bool:
        """Records of a claimed batch still start during the grace period, until a margin
        before its end: a record started in the last moment could not finish anyway."""
        if self.hard_stop_at is None:
            return True
        margin = min(2.0, 0.2 * self.settings.grace_seconds)
        return time.monotonic() < self.hard_stop_at - margin

    def queue_is_empty(self, conn: psycopg.Connection) -> bool:
        flow = self.settings.flow_name
        counts = queue.stats(conn, flow, completed=False).get(flow, {})
        return counts.get("pending_records", 0) == 0 and counts.get("processing_records", 0) == 0

    # -- background threads ---------------------------------------------------------

    def _listen(self) -> None:
        """LISTEN for enqueues of our flow; on any trouble, reconnect. Polling in the claim
        loops covers the gaps, so a lost notification costs latency, never work."""
        delay = 0.5
        while not self.stopping.is_set():
            try:
                with self.db.connect() as conn:
                    queue.listen(conn)
                    delay = 0.5
                    self.wake.bump()  # anything enqueued while we were away
                    while not self.stopping.is_set():
                        for note in conn.notifies(timeout=1.0):
                            if note.payload == self.settings.flow_name:
                                self.wake.bump()
            except (psycopg.Error, DatabaseUnavailableError):
                self.stopping.wait(delay)
                delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    def _keep(self) -> None:
        """Renew leases of in-flight records; return records of dead claimers; sample
        queue depth for /metrics."""
        s = self.settings
        conn: psycopg.Connection | None = None
        next_sweep = 0.0
        # Runs until the main thread has drained the loops: leases stay renewed through
        # the grace period.
        while not self.finished.wait(s.heartbeat_seconds):
            # Ticks whether or not the database answers: /healthz asks "is this process
            # stuck", and restarting a pod does not end a database outage.
            self.keeper_tick = time.monotonic()
            try:
                if conn is None or conn.closed:
                    conn = self.db.connect()
                for loop in self.loops:
                    # A hung record's lease is left to run out: like a crashed worker's,
                    # it comes back, counted as abandoned.
                    if not loop.stuck_for():
                        queue.heartbeat(conn, loop.snapshot(), s.lease_seconds)
                if time.monotonic() >= next_sweep and not self.stopping.is_set():
                    released = queue.release_orphans(
                        conn, None, s.flow_name, max_abandons=s.max_abandons
                    )
                    if released:
                        log.info("returned %d records of dead claimers to the queue", len(released))
                        self.wake.bump()
                    self._sample_depth(conn)
                    next_sweep = time.monotonic() + min(s.lease_seconds, 10.0)
            except (psycopg.Error, DatabaseUnavailableError) as exc:
                log.warning("lease keeper: %s", self.db.unavailable(exc))
                conn = None
        if conn is not None:
            conn.close()

    def _sample_depth(self, conn: psycopg.Connection) -> None:
        # The live queue only: every worker samples it every few seconds, and counting
        # the ever-growing history that often would cost more than the work it watches.
        flow = self.settings.flow_name
        counts = queue.stats(conn, flow, completed=False).get(flow, {})
        for status in ("pending", "processing", "failed"):
            self.metrics.queue_depth.labels(self.settings.flow_name, status).set(
                counts.get(f"{status}_records", 0)
            )

    # -- health ---------------------------------------------------------------------

    def alive(self) -> tuple[bool, str]:
        if not self.started.is_set():
            # Waiting for the database is alive: a restart would meet the same outage.
            return True, "waiting for the database"
        dead = [loop.index for loop in self.loops if not loop.thread.is_alive()]
        if dead and not self.stopping.is_set():
            return False, f"claim loops {dead} have died"
        stuck = [loop.index for loop in self.loops if loop.stuck_for()]
        if stuck:
            return False, (
                f"claim loops {stuck} stuck on a record for longer than "
                f"{self.settings.record_timeout_seconds:g}s"
            )
        stale = time.monotonic() - self.keeper_tick
        if stale > 3 * self.settings.heartbeat_seconds + 5:
            return False, f"lease keeper stuck for {stale:.0f}s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        if self.stopping.is_set():
            return False, "stopping"
        try:
            with self.db.connection(timeout=2.0) as conn:
                version = current_version(conn)
        except DatabaseUnavailableError as exc:
            return False, str(exc)
        if version < latest_version():
            return False, f"schema at version {version}, need {latest_version()}"
        return True, "ok"

    # -- main -----------------------------------------------------------------------

    def run(self, install_signals: bool = True) -> int:
        from flowfleet.httpserver import serve

        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(
                    sig, lambda signum, _frame: self.request_stop(signal.Signals(signum).name)
                )
        server = serve(self, self.settings.http_port) if self.settings.http_port else None
        if not self._wait_for_database():
            return 0
        background = [
            threading.Thread(target=self._listen, name="listener", daemon=True),
            threading.Thread(target=self._keep, name="lease-keeper", daemon=True),
        ]
        for thread in background:
            thread.start()
        for loop in self.loops:
            loop.thread.start()
        self.keeper_tick = time.monotonic()
        self.started.set()
        log.info(
            "worker started: runner=%s batch_size=%d concurrency=%d entrypoint=%s",
            self.settings.runner,
            self.settings.batch_size,
            self.settings.concurrency,
            self.processor.name,
        )
        while not self.stopping.wait(0.5):
            pass
        self._drain()
        self.finished.set()
        if server is not None:
            server.shutdown()
        log.info("worker stopped")
        return 0

    def _wait_for_database(self) -> bool:
        """An unreachable database is waited for, not crashed on: a pod that exits would
        only be restarted into the same outage. /readyz says why meanwhile."""
        delay = 1.0
        while not self.stopping.is_set():
            try:
                with self.db.connection(timeout=5.0) as conn:
                    check_schema(conn)
                    # A restarted container keeps its pod's name: claims under it are
                    # from before the restart, and nobody else will ever renew them.
                    if back := queue.release_instance(
                        conn,
                        self.settings.flow_name,
                        self.instance_id,
                        max_abandons=self.settings.max_abandons,
                    ):
                        log.warning("returned %d records claimed before a restart", len(back))
                return True
            except DatabaseUnavailableError as exc:
                log.warning("%s; retrying in %.0fs", exc, delay)
                self.stopping.wait(delay)
                delay = min(delay * 2, RECONNECT_MAX_SECONDS)
        return False

    def _drain(self) -> None:
        """Wait out the grace period for loops to finish, then settle what is left: records
        already processed are completed, the others handed back."""
        assert self.hard_stop_at is not None
        for loop in self.loops:
            loop.thread.join(max(0.0, self.hard_stop_at - time.monotonic()))
        done: list[queue.Claimed] = []
        results: list[Any] = []
        rest: list[queue.Claimed] = []
        for loop in self.loops:
            if loop.thread.is_alive():
                loop_done, loop_results, loop_rest = loop.leftovers()
                done += loop_done
                results += loop_results
                rest += loop_rest
        if not done and not rest:
            return
        # The abandoned threads may still answer; the claim tokens make their late
        # completions and releases no-ops.
        try:
            with self.db.connection(timeout=5.0) as conn:
                completed = queue.complete(
                    conn, done, results if any(r is not None for r in results) else None
                )
                released = queue.release(conn, rest)
            log.warning(
                "grace period over: completed %d processed records, released %d others",
                len(completed),
                len(released),
            )
            self.metrics.completed.inc(len(completed))
            self.metrics.released.inc(len(released))
        except DatabaseUnavailableError as exc:
            log.warning("could not settle in-flight records (%s); their leases will", exc)

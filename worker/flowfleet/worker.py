"""The worker process: puts the claim loops, the runner, the lease keeper, the wake-ups
and the health server together, and runs them until SIGTERM or SIGINT.

Threads of one process:
- ``concurrency`` claim loops (``claimloop``), each with its own connection and runner
  (``plain_runner`` or ``prefect_runner``);
- a listener (``wakeups``) that wakes idle loops the moment work arrives;
- a lease keeper (``keeper``) that renews the leases of in-flight records and returns dead
  claimers' records;
- an HTTP server (``httpserver``) for ``/healthz``, ``/readyz`` and ``/metrics``.
The main thread waits for a stop request (``lifecycle``), then stops claiming, lets
in-flight records finish within the grace period, settles what is left and exits 0.
"""

from __future__ import annotations

import logging
import threading
from http.server import ThreadingHTTPServer

from flowfleet import queue
from flowfleet.batchjob import Processing
from flowfleet.claimloop import ClaimLoop, ClaimSettings, Runner
from flowfleet.database import DatabaseManager
from flowfleet.entrypoint import Processor
from flowfleet.health import CheckResult, LivenessFacts, liveness, readiness
from flowfleet.httpserver import serve
from flowfleet.keeper import KeeperSettings, LeaseKeeper
from flowfleet.lifecycle import (
    Shutdown,
    check_schema,
    release_previous_claims,
    settle_unfinished,
    stop_on_signals,
    wait_for_database,
)
from flowfleet.metrics import WorkerMetrics
from flowfleet.migrate import current_version
from flowfleet.prefect_api import PrefectApi
from flowfleet.settings import WorkerSettings
from flowfleet.sql import latest_version
from flowfleet.wakeups import WakeUps, wake_on_enqueues

__all__ = ["Worker", "check_schema"]

log = logging.getLogger("flowfleet.worker")


def make_runner(settings: WorkerSettings, processing: Processing) -> Runner:
    if settings.runner == "plain":
        from flowfleet.plain_runner import PlainRunner

        return PlainRunner(processing)
    # Imported only here: the plain runner should not pay Prefect's import time.
    from flowfleet.logs import adopt_prefect_loggers
    from flowfleet.prefect_runner import PrefectRunner

    adopt_prefect_loggers()

    return PrefectRunner(settings.flow_name, processing, settings.flow_run_seconds)


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
        self.metrics = WorkerMetrics(settings.flow_name)
        self.wakeups = WakeUps()
        self.shutdown = Shutdown(settings.grace_seconds, self.wakeups)
        self.started = threading.Event()
        self.finished = threading.Event()
        # Non-zero once a claim loop has ended for good: the process stops and says so.
        self.exit_code = 0
        # The Prefect runner's API: said at start-up, checked for /readyz.
        self.prefect_api = PrefectApi() if settings.runner == "prefect" else None
        processing = Processing(
            processor,
            queue.RetryPolicy(
                max_retries=settings.max_retries,
                backoff_base=settings.retry_backoff_seconds,
                backoff_cap=settings.retry_backoff_max_seconds,
            ),
            instance_id,
            self.shutdown.accepting_records,
        )
        claim_settings = ClaimSettings(
            flow_name=settings.flow_name,
            instance_id=instance_id,
            batch_size=settings.batch_size,
            lease_seconds=settings.lease_seconds,
            poll_seconds=settings.poll_seconds,
            exit_when_empty=settings.exit_when_empty,
            max_batch_bytes=settings.max_batch_bytes,
        )
        self.loops = [
            ClaimLoop(
                index,
                claim_settings,
                db,
                make_runner(settings, processing),
                self.wakeups,
                self.shutdown.requested,
                lambda: self.shutdown.request("queue empty"),
                self.metrics,
                on_fatal=self._loop_ended,
            )
            for index in range(settings.concurrency)
        ]
        self.keeper = LeaseKeeper(
            KeeperSettings(
                flow_name=settings.flow_name,
                lease_seconds=settings.lease_seconds,
                heartbeat_seconds=settings.heartbeat_seconds,
                max_abandons=settings.max_abandons,
                record_timeout_seconds=settings.record_timeout_seconds,
            ),
            db.connect,
            db.unavailable,
            [loop.in_flight for loop in self.loops],
            self.wakeups,
            self.shutdown.requested,
            self.finished,
            self.metrics.queue_depth,
        )

    def request_stop(self, why: str) -> None:
        self.shutdown.request(why)

    def _loop_ended(self, why: str) -> None:
        self.exit_code = 1
        self.shutdown.request(why)

    # -- health ---------------------------------------------------------------------

    def alive(self) -> CheckResult:
        limit = self.settings.record_timeout_seconds
        return liveness(
            LivenessFacts(
                started=self.started.is_set(),
                stopping=self.shutdown.requested.is_set(),
                heartbeat_seconds=self.settings.heartbeat_seconds,
                record_timeout_seconds=limit,
                dead_loops=[loop.index for loop in self.loops if not loop.thread.is_alive()],
                stuck_loops=[
                    loop.index for loop in self.loops if loop.in_flight.seconds_past_timeout(limit)
                ],
                keeper_silent_seconds=self.keeper.seconds_since_tick(),
            )
        )

    def ready(self) -> CheckResult:
        def schema_version() -> int:
            with self.db.connection(timeout=2.0) as conn:
                return current_version(conn)

        return readiness(
            self.shutdown.requested.is_set(),
            schema_version,
            latest_version(),
            self.prefect_api.check if self.prefect_api is not None else None,
        )

    # -- main -----------------------------------------------------------------------

    def run(self, install_signals: bool = True) -> int:
        if install_signals:
            stop_on_signals(self.shutdown)
        server: ThreadingHTTPServer | None = None
        if self.settings.http_port:
            checks = {"healthz": self.alive, "readyz": self.ready}
            server = serve(self.settings.http_port, checks, self.metrics.registry)
        if self.prefect_api is not None:
            self.prefect_api.connect(self.shutdown.requested)
        if not wait_for_database(self.db.connection, self.shutdown.requested):
            return 0
        release_previous_claims(
            self.db.connection,
            self.settings.flow_name,
            self.instance_id,
            self.settings.max_abandons,
        )
        background = [
            threading.Thread(
                target=wake_on_enqueues,
                args=(
                    self.db,
                    self.settings.flow_name,
                    self.wakeups,
                    self.shutdown.requested,
                ),
                name="listener",
                daemon=True,
            ),
            threading.Thread(target=self.keeper.run, name="lease-keeper", daemon=True),
        ]
        for thread in background:
            thread.start()
        for loop in self.loops:
            loop.thread.start()
        self.keeper.tick()  # waiting for the database was not the keeper hanging
        self.started.set()
        log.info(
            "worker started: runner=%s batch_size=%d concurrency=%d entrypoint=%s",
            self.settings.runner,
            self.settings.batch_size,
            self.settings.concurrency,
            self.processor.name,
        )
        while not self.shutdown.requested.wait(0.5):
            pass
        self._drain()
        self.finished.set()
        if server is not None:
            server.shutdown()
        if self.prefect_api is not None:
            self.prefect_api.close()
        log.info("worker stopped")
        return self.exit_code

    def _drain(self) -> None:
        """Wait out the grace period for loops to finish, then settle what is left: records
        already processed are completed, the others handed back."""
        for loop in self.loops:
            loop.thread.join(self.shutdown.seconds_left())
        # A loop that ended holding records (it could not reach the database to settle
        # them) is settled here too.
        unfinished = [
            loop.in_flight
            for loop in self.loops
            if loop.thread.is_alive() or loop.in_flight.records()
        ]
        settled = settle_unfinished(self.db.connection, unfinished)
        if settled is not None:
            completed, released = settled
            self.metrics.completed.inc(completed)
            self.metrics.released.inc(released)

"""The lease keeper: renews the leases of the records the claim loops hold, returns the
records of dead claimers to the queue, and samples the queue's depth for /metrics."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import psycopg
from prometheus_client import Gauge

from flowfleet import queue
from flowfleet.errors import DatabaseUnavailableError
from flowfleet.inflight import InFlight
from flowfleet.wakeups import WakeUps

log = logging.getLogger("flowfleet.worker")


@dataclass(frozen=True)
class KeeperSettings:
    flow_name: str
    lease_seconds: float
    heartbeat_seconds: float
    max_abandons: int
    record_timeout_seconds: float = 0.0


class LeaseKeeper:
    def __init__(
        self,
        settings: KeeperSettings,
        connect: Callable[[], psycopg.Connection],
        describe_outage: Callable[[object], object],
        holdings: Sequence[InFlight],
        wakeups: WakeUps,
        stopping: threading.Event,
        finished: threading.Event,
        queue_depth: Gauge,
    ) -> None:
        self.settings = settings
        self.connect = connect
        self.describe_outage = describe_outage
        self.holdings = holdings
        self.wakeups = wakeups
        self.stopping = stopping
        self.finished = finished
        self.queue_depth = queue_depth
        self.last_tick = time.monotonic()
        # Whether this keeper's session holds the flow's depth-reporting lock.
        self.reports_depth = False

    def tick(self) -> None:
        self.last_tick = time.monotonic()

    def seconds_since_tick(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.last_tick

    def run(self) -> None:
        s = self.settings
        conn: psycopg.Connection | None = None
        next_sweep = 0.0
        # Runs until the main thread has drained the loops: leases stay renewed through
        # the grace period.
        while not self.finished.wait(s.heartbeat_seconds):
            # Ticks whether or not the database answers: /healthz asks "is this process
            # stuck", and restarting a pod does not end a database outage.
            self.tick()
            try:
                if conn is None or conn.closed:
                    conn = self.connect()
                self._renew_leases(conn)
                if time.monotonic() >= next_sweep and not self.stopping.is_set():
                    self._return_orphans(conn)
                    self._sample_depth(conn)
                    next_sweep = time.monotonic() + min(s.lease_seconds, 10.0)
            except (psycopg.Error, DatabaseUnavailableError) as exc:
                log.warning("lease keeper: %s", self.describe_outage(exc))
                conn = None
                self.reports_depth = False  # the lock went with the session
        if conn is not None:
            conn.close()

    def _renew_leases(self, conn: psycopg.Connection) -> None:
        for held in self.holdings:
            # A hung record's lease is left to run out: like a crashed worker's, it comes
            # back, counted as abandoned.
            if not held.seconds_past_timeout(self.settings.record_timeout_seconds):
                queue.heartbeat(conn, held.records(), self.settings.lease_seconds)

    def _return_orphans(self, conn: psycopg.Connection) -> None:
        s = self.settings
        released = queue.release_orphans(
            conn,
            None,
            s.flow_name,
            max_abandons=s.max_abandons,
            # After a database restart, every live keeper gets a lease's length to renew
            # what its loops hold before anyone's lease counts as run out.
            reconnect_seconds=s.lease_seconds,
        )
        if released:
            log.info("returned %d records of dead claimers to the queue", len(released))
            self.wakeups.bump()

    def _sample_depth(self, conn: psycopg.Connection) -> None:
        # The live queue only: every worker samples it every few seconds, and counting
        # the ever-growing history that often would cost more than the work it watches.
        flow = self.settings.flow_name
        if not self.reports_depth:
            self.reports_depth = queue.take_depth_reporting(conn, flow)
        if not self.reports_depth:
            self.queue_depth.clear()  # another worker of the flow exports it
            return
        counts = queue.stats(conn, flow, completed=False).get(flow, {})
        for status in ("pending", "processing", "failed"):
            self.queue_depth.labels(flow, status).set(counts.get(f"{status}_records", 0))

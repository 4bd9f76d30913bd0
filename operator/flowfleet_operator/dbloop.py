"""One database's loop: its flows' periodic tick and the LISTEN fast path."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import TYPE_CHECKING

from flowfleet_operator.flowstate import FlowKey
from flowfleet_operator.queuedb import Database

if TYPE_CHECKING:
    from flowfleet_operator.fleet import Fleet

log = logging.getLogger("flowfleet_operator")

# An enqueue wakes its database's loop after this pause, so a burst of NOTIFYs (one per
# producer transaction) costs one depth read, not one each.
DEBOUNCE_S = 0.02
# Fast-path ticks come at most this often per database, however busy the producers.
MIN_FAST_GAP_S = 0.25


class DatabaseLoop:
    """One database: its flows' periodic tick and the LISTEN fast path."""

    def __init__(self, fleet: Fleet, dsn: str) -> None:
        self.fleet = fleet
        self.db = Database(dsn)
        self.dsn = dsn
        self.flows: set[FlowKey] = set()
        self.wake = asyncio.Event()
        self.notified = False
        self.stop = threading.Event()
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.create_task(self.run(), name=f"database {self.db.where}")
        self.listener: threading.Thread | None = None
        if fleet.settings.listen:
            self.listener = threading.Thread(
                target=self.db.listen, args=(self._on_notify, self.stop), daemon=True
            )
            self.listener.start()

    def _on_notify(self, flow_name: str) -> None:  # runs in the listener thread
        self.loop.call_soon_threadsafe(self._notified, flow_name)

    def _notified(self, flow_name: str) -> None:
        if any(
            self.fleet.flows[k].spec.flow_name == flow_name
            for k in self.flows
            if k in self.fleet.flows
        ):
            self.notified = True
            self.wake.set()

    def interval(self) -> float:
        specs = [self.fleet.flows[k].spec for k in self.flows if k in self.fleet.flows]
        return float(min((s.poll_interval_seconds for s in specs), default=10))

    async def run(self) -> None:
        last_tick = 0.0
        while not self.stop.is_set():
            due = last_tick + self.interval()
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=max(0.0, due - time.monotonic()))
            except asyncio.TimeoutError:
                pass
            fast = self.notified
            if fast:
                await asyncio.sleep(max(DEBOUNCE_S, last_tick + MIN_FAST_GAP_S - time.monotonic()))
            self.wake.clear()
            self.notified = False
            last_tick = time.monotonic()
            try:
                await self.fleet.tick(self, fast=fast)
            except Exception:  # one bad tick must not end the loop
                log.exception("tick on %s failed", self.db.where)

    async def close(self) -> None:
        self.stop.set()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        if self.listener is not None:
            await asyncio.to_thread(self.listener.join, 3)
        self.db.close()

"""What one claim loop holds, shared with the threads that watch it.

The lease keeper renews the records held; the health check asks whether the record now
running has overrun its timeout; at the end of the grace period the main thread completes
what the batch has processed and releases only the rest.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from flowfleet import queue
from flowfleet.batch import BatchOutcome


@dataclass(frozen=True)
class Unsettled:
    """A held batch, split for settling: processed records (with their results) to
    complete, the rest to release."""

    processed: list[queue.Claimed] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)
    unprocessed: list[queue.Claimed] = field(default_factory=list)


class InFlight:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[queue.Claimed] = []
        # The batch being processed, filled record by record.
        self._progress: BatchOutcome | None = None

    def hold(self, records: list[queue.Claimed]) -> None:
        """Take ``records`` as the batch in hand (the previous one is settled)."""
        with self._lock:
            self._records = list(records)
            self._progress = None

    def track(self, progress: BatchOutcome) -> None:
        """Watch ``progress``: the outcome the running batch fills as it goes."""
        with self._lock:
            self._progress = progress

    def clear(self) -> int:
        """Let go of the batch; returns how many records it held."""
        with self._lock:
            count = len(self._records)
            self._records = []
            self._progress = None
        return count

    def records(self) -> list[queue.Claimed]:
        with self._lock:
            return list(self._records)

    def seconds_past_timeout(self, limit: float, now: float | None = None) -> float:
        """Seconds the running record has run past ``limit`` (0: not stuck, or no limit)."""
        with self._lock:
            started = self._progress.current_started if self._progress is not None else None
        if not limit or started is None:
            return 0.0
        return max(0.0, (time.monotonic() if now is None else now) - started - limit)

    def renewable(self, limit: float, now: float | None = None) -> list[queue.Claimed]:
        """The records whose leases to renew: all held, but a record running past ``limit``.

        Only the hung record's lease is left to run out (it comes back counted as
        abandoned); its batch-mates, finished ones among them, stay ours: dropping them
        would let another worker run again what this one already processed."""
        records = self.records()
        if not self.seconds_past_timeout(limit, now):
            return records
        with self._lock:
            hung = self._progress.current_id if self._progress is not None else None
        return [r for r in records if r.id != hung]

    def unsettled(self) -> Unsettled:
        with self._lock:
            records, progress = list(self._records), self._progress
        if progress is None:
            return Unsettled(unprocessed=records)
        # Results are appended before their record, so they are never fewer.
        processed = list(progress.completed)
        results = progress.results[: len(processed)]
        finished = {r.id for r in processed}
        return Unsettled(processed, results, [r for r in records if r.id not in finished])

"""Prometheus metrics of one worker process: the flow's record counters, and the standard
``process_*`` and ``python_*`` series of the process."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

# A `_created` series per counter doubles what Prometheus stores and says nothing an
# operator asks about (process_start_time_seconds tells when counting began).
disable_created_metrics()


class ClaimedRecord(Protocol):
    @property
    def id(self) -> int: ...

    @property
    def retry_count(self) -> int: ...


# Ids of records this process handed back, remembered so that claiming one again counts
# as a re-claim; bounded, the oldest forgotten first.
HANDED_BACK_REMEMBERED = 100_000


def add_process_collectors(registry: CollectorRegistry) -> None:
    """``process_*`` (CPU, memory, open files, start time) and ``python_*`` (version, GC)."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)


class WorkerMetrics:
    def __init__(self, flow_name: str) -> None:
        self.registry = CollectorRegistry()
        add_process_collectors(self.registry)
        self._lock = threading.Lock()
        self._handed_back: OrderedDict[int, bool] = OrderedDict()
        labels = ["flow"]
        self.claimed = Counter(
            "flowfleet_records_claimed",
            "Records claimed for their first attempt (a retry's claim counts in"
            " flowfleet_records_reclaimed; a record released and claimed again counts again,"
            " and in flowfleet_records_released).",
            labels,
            registry=self.registry,
        ).labels(flow_name)
        self.reclaimed = Counter(
            "flowfleet_records_reclaimed",
            "Claims of records on a retry.",
            labels,
            registry=self.registry,
        ).labels(flow_name)
        self.completed = Counter(
            "flowfleet_records_completed", "Records completed.", labels, registry=self.registry
        ).labels(flow_name)
        self.failed = Counter(
            "flowfleet_records_failed",
            "Records failed for good after their retries.",
            labels,
            registry=self.registry,
        ).labels(flow_name)
        self.retried = Counter(
            "flowfleet_records_retried",
            "Failures sent back to retry.",
            labels,
            registry=self.registry,
        ).labels(flow_name)
        self.fenced = Counter(
            "flowfleet_records_fenced",
            "Completions refused because the claim was taken back.",
            labels,
            registry=self.registry,
        ).labels(flow_name)
        self.released = Counter(
            "flowfleet_records_released",
            "Claimed records handed back unprocessed (shutdown, or a claim loop error).",
            labels,
            registry=self.registry,
        ).labels(flow_name)
        self.in_flight = Gauge(
            "flowfleet_records_in_flight",
            "Records claimed, not finished.",
            labels,
            registry=self.registry,
        ).labels(flow_name)
        self.batch_seconds = Histogram(
            "flowfleet_batch_duration_seconds",
            "Time to process one claimed batch.",
            labels,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        ).labels(flow_name)
        self.queue_depth = Gauge(
            "flowfleet_queue_depth",
            "Records of the flow by status.",
            ["flow", "status"],
            registry=self.registry,
        )

    def count_claims(self, batch: Sequence[ClaimedRecord]) -> None:
        """Count a fresh claim: first attempts as claimed; retries, and records this
        process handed back and took again, as reclaimed. So claimed is not inflated by
        the same record coming back (a claim loop that keeps failing on one batch)."""
        with self._lock:
            again = 0
            for record in batch:
                if record.retry_count > 0:
                    again += 1
                elif self._handed_back.pop(record.id, None) is not None:
                    again += 1
        self.claimed.inc(len(batch) - again)
        self.reclaimed.inc(again)

    def count_released(self, ids: Sequence[int]) -> None:
        """Count records handed back unprocessed, and remember them for count_claims."""
        self.released.inc(len(ids))
        with self._lock:
            for record_id in ids:
                self._handed_back[record_id] = True
            while len(self._handed_back) > HANDED_BACK_REMEMBERED:
                self._handed_back.popitem(last=False)

"""Prometheus metrics of one worker process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class WorkerMetrics:
    def __init__(self, flow_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["flow"]
        self.claimed = Counter(
            "flowfleet_records_claimed", "Records claimed.", labels, registry=self.registry
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
            "Claimed records handed back unprocessed (shutdown).",
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

"""The worker's metrics: standard process and Python series, no `_created`, first claims
apart from retries' claims."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from flowfleet.metrics import WorkerMetrics


@dataclass(frozen=True)
class Claimed:
    retry_count: int
    id: int = 0


def values(metrics: WorkerMetrics) -> dict[str, float]:
    body = generate_latest(metrics.registry).decode()
    return {
        s.name: s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
        if s.labels.get("flow", "survey") == "survey"
    }


def test_standard_series_and_no_created() -> None:
    names = set(values(WorkerMetrics("survey")))
    assert "process_cpu_seconds_total" in names
    assert "python_info" in names
    assert "flowfleet_records_claimed_total" in names
    assert not [n for n in names if n.endswith("_created")]


def test_retries_claims_are_counted_apart() -> None:
    metrics = WorkerMetrics("survey")
    metrics.count_claims([Claimed(0, 1), Claimed(0, 2), Claimed(1, 3), Claimed(3, 4)])
    metrics.count_claims([Claimed(0, 5)])
    found = values(metrics)
    assert found["flowfleet_records_claimed_total"] == 3
    assert found["flowfleet_records_reclaimed_total"] == 2


def test_two_workers_in_one_process_have_registries_of_their_own() -> None:
    first, second = WorkerMetrics("survey"), WorkerMetrics("survey")
    first.count_claims([Claimed(0)])
    assert values(second)["flowfleet_records_claimed_total"] == 0


def test_records_handed_back_and_taken_again_count_once_as_claimed() -> None:
    metrics = WorkerMetrics("survey")
    batch = [Claimed(0, 1), Claimed(0, 2)]
    metrics.count_claims(batch)
    for _ in range(3):  # a loop that fails on this batch, hands it back, claims it again
        metrics.count_released([1, 2])
        metrics.count_claims(batch)
    found = values(metrics)
    assert found["flowfleet_records_claimed_total"] == 2
    assert found["flowfleet_records_reclaimed_total"] == 6
    assert found["flowfleet_records_released_total"] == 6
    # A record released once and claimed once more counts as reclaimed only that once.
    metrics.count_claims([Claimed(0, 1)])
    assert values(metrics)["flowfleet_records_claimed_total"] == 3

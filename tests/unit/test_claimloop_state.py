"""What a claim loop holds, and how it hands it to the lease keeper, the health check and
the main thread: the claim loop's state, without a database."""

from __future__ import annotations

import threading
from datetime import datetime, timezone

import psycopg
import pytest

from flowfleet import queue
from flowfleet.backoff import Backoff
from flowfleet.batch import BatchOutcome
from flowfleet.claimloop import BatchSequence, ClaimLoop, ClaimSettings
from flowfleet.errors import DatabaseUnavailableError
from flowfleet.inflight import InFlight
from flowfleet.lifecycle import Shutdown
from flowfleet.metrics import WorkerMetrics
from flowfleet.wakeups import WakeUps


def record(record_id: int) -> queue.Claimed:
    return queue.Claimed(record_id, {"n": record_id}, 0, 1, datetime.now(timezone.utc), 0)


class NoDatabase:
    """The claim loop's database when none may be reached: every use fails the test."""

    def connect(self) -> psycopg.Connection:
        raise AssertionError("the state under test needs no database")

    def connection(self, timeout: float = 10.0) -> psycopg.Connection:
        raise AssertionError("the state under test needs no database")

    def unavailable(self, cause: object) -> DatabaseUnavailableError:
        return DatabaseUnavailableError(str(cause))


class NoRunner:
    def run_busy_stretch(self, first_batch: list[queue.Claimed], loop: BatchSequence) -> None:
        raise AssertionError("nothing is run here")


def claim_loop(metrics: WorkerMetrics) -> ClaimLoop:
    settings = ClaimSettings("f", "pod-1", batch_size=10, lease_seconds=30, poll_seconds=5)
    return ClaimLoop(
        0, settings, NoDatabase(), NoRunner(), WakeUps(), threading.Event(), lambda: None, metrics
    )


def gauge(metrics: WorkerMetrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name, {"flow": "f"})
    return value or 0.0


# -- InFlight ------------------------------------------------------------------------------


def test_held_records_are_what_the_keeper_renews() -> None:
    held = InFlight()
    batch = [record(1), record(2)]
    held.hold(batch)
    batch.append(record(3))  # the loop's own list may change; the holding does not
    assert [r.id for r in held.records()] == [1, 2]
    assert held.clear() == 2
    assert held.records() == []
    assert held.clear() == 0


def test_a_batch_not_yet_started_is_all_released() -> None:
    held = InFlight()
    held.hold([record(1), record(2)])
    split = held.unsettled()
    assert split.processed == [] and split.results == []
    assert [r.id for r in split.unprocessed] == [1, 2]


def test_a_batch_half_done_splits_into_complete_and_release() -> None:
    held = InFlight()
    batch = [record(1), record(2), record(3)]
    held.hold(batch)
    progress = BatchOutcome()
    held.track(progress)
    progress.results.append({"r": 1})
    progress.completed.append(batch[0])
    progress.results.append({"r": 2})  # the second record's result landed, not yet it
    split = held.unsettled()
    assert [r.id for r in split.processed] == [1]
    assert split.results == [{"r": 1}]  # never more results than records
    assert [r.id for r in split.unprocessed] == [2, 3]


def test_stuck_only_past_the_record_timeout() -> None:
    held = InFlight()
    held.hold([record(1)])
    progress = BatchOutcome(current_started=100.0)
    held.track(progress)
    assert held.seconds_past_timeout(10, now=105.0) == 0.0
    assert held.seconds_past_timeout(10, now=112.5) == pytest.approx(2.5)
    assert held.seconds_past_timeout(0, now=10_000.0) == 0.0  # 0: no limit
    held.clear()
    assert held.seconds_past_timeout(10, now=10_000.0) == 0.0  # nothing running


def test_only_the_hung_record_stops_being_renewed() -> None:
    held = InFlight()
    held.hold([record(1), record(2), record(3)])
    # Record 1 is finished (its completion commits with the batch), 2 runs, 3 waits.
    held.track(BatchOutcome(completed=[record(1)], current_id=2, current_started=100.0))
    assert [r.id for r in held.renewable(10, now=105.0)] == [1, 2, 3]
    assert [r.id for r in held.renewable(10, now=120.0)] == [1, 3]
    assert [r.id for r in held.renewable(0, now=10_000.0)] == [1, 2, 3]  # 0: no limit


def test_a_new_claim_forgets_the_last_batch_progress() -> None:
    held = InFlight()
    held.hold([record(1)])
    held.track(BatchOutcome(current_started=0.0))
    held.hold([record(2)])
    assert held.seconds_past_timeout(1, now=1_000.0) == 0.0
    assert [r.id for r in held.unsettled().unprocessed] == [2]


# -- the claim loop's bookkeeping ------------------------------------------------------------


def test_holding_and_letting_go_keep_the_metrics() -> None:
    metrics = WorkerMetrics("f")
    loop = claim_loop(metrics)
    loop._hold_in_flight([record(1), record(2), record(3)])
    assert gauge(metrics, "flowfleet_records_in_flight") == 3
    assert gauge(metrics, "flowfleet_records_claimed_total") == 3
    assert len(loop.in_flight.records()) == 3
    loop._hold_in_flight([])  # an empty claim holds nothing and counts nothing
    assert gauge(metrics, "flowfleet_records_claimed_total") == 3
    loop._drop_in_flight()
    assert gauge(metrics, "flowfleet_records_in_flight") == 0
    assert loop.in_flight.records() == []


def test_outcome_counts_reach_the_metrics() -> None:
    metrics = WorkerMetrics("f")
    loop = claim_loop(metrics)
    outcome = BatchOutcome(
        completed=[record(1)], committed=2, retried=1, failed=1, fenced=1, unprocessed=[record(9)]
    )
    loop._count_outcome(outcome)
    assert gauge(metrics, "flowfleet_records_completed_total") == 3
    assert gauge(metrics, "flowfleet_records_retried_total") == 1
    assert gauge(metrics, "flowfleet_records_failed_total") == 1
    assert gauge(metrics, "flowfleet_records_fenced_total") == 1
    assert gauge(metrics, "flowfleet_records_released_total") == 1


# -- backoff and shutdown ------------------------------------------------------------------


def test_backoff_doubles_to_its_cap_and_resets() -> None:
    backoff = Backoff(first=0.5, cap=3.0)
    assert [backoff.next_delay() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    backoff.reset()
    assert backoff.next_delay() == 0.5


def test_shutdown_wakes_the_loops_once_and_keeps_a_margin() -> None:
    wakeups = WakeUps()
    shutdown = Shutdown(grace_seconds=10, wakeups=wakeups)
    assert shutdown.accepting_records()
    assert shutdown.seconds_left() == float("inf")
    shutdown.request("SIGTERM")
    shutdown.request("SIGINT")  # a second signal changes nothing
    assert shutdown.requested.is_set()
    assert wakeups.generation == 1
    assert shutdown.hard_stop_at is not None
    end = shutdown.hard_stop_at
    # Records still start until a margin (2 s of a 10 s grace) before its end.
    assert shutdown.accepting_records(now=end - 2.5)
    assert not shutdown.accepting_records(now=end - 1.5)
    assert 0 < shutdown.seconds_left() <= 10

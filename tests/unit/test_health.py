"""/healthz and /readyz as decisions from facts."""

from __future__ import annotations

from flowfleet.errors import DatabaseUnavailableError
from flowfleet.health import LivenessFacts, liveness, readiness


def facts(**changes: object) -> LivenessFacts:
    base: dict[str, object] = {"started": True, "stopping": False, "heartbeat_seconds": 10.0}
    base.update(changes)
    return LivenessFacts(**base)  # type: ignore[arg-type]


def test_alive_when_all_is_well() -> None:
    assert liveness(facts()) == (True, "ok")


def test_waiting_for_the_database_is_alive() -> None:
    # Dead-looking facts do not count before the start: a restart meets the same outage.
    ok, reason = liveness(facts(started=False, dead_loops=[0], keeper_silent_seconds=1e6))
    assert ok and reason == "waiting for the database"


def test_a_dead_claim_loop_is_not_alive_unless_stopping() -> None:
    assert liveness(facts(dead_loops=[1, 3])) == (False, "claim loops [1, 3] have died")
    assert liveness(facts(dead_loops=[1, 3], stopping=True)) == (True, "ok")


def test_a_stuck_record_is_not_alive() -> None:
    ok, reason = liveness(facts(stuck_loops=[0], record_timeout_seconds=2.5))
    assert not ok
    assert reason == "claim loops [0] stuck on a record for longer than 2.5s"


def test_a_silent_keeper_is_not_alive_after_three_heartbeats_and_slack() -> None:
    assert liveness(facts(keeper_silent_seconds=35.0))[0]  # 3 x 10 s + 5 s
    ok, reason = liveness(facts(keeper_silent_seconds=35.5))
    assert not ok and reason == "lease keeper stuck for 36s"


def test_ready_when_the_schema_is_current() -> None:
    assert readiness(False, lambda: 2, needed=2) == (True, "ok")
    assert readiness(False, lambda: 3, needed=2) == (True, "ok")


def test_not_ready_while_stopping_without_asking_the_database() -> None:
    def never() -> int:
        raise AssertionError("a stopping worker does not query")

    assert readiness(True, never, needed=2) == (False, "stopping")


def test_not_ready_on_an_old_schema_or_an_outage() -> None:
    assert readiness(False, lambda: 1, needed=2) == (False, "schema at version 1, need 2")

    def outage() -> int:
        raise DatabaseUnavailableError("cannot reach database 'rpa_db' at h:5432/d: refused")

    assert readiness(False, outage, needed=2) == (
        False,
        "cannot reach database 'rpa_db' at h:5432/d: refused",
    )

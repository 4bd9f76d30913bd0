"""Chaos: workers SIGKILLed mid-run lose nothing and complete every record exactly once.

Six plain-runner workers drain 20,000 records whose processor appends the record's key to
a file: an at-least-once effect log outside the queue's transactions. Ten times during the
run a random worker is SIGKILLed and a replacement with a new pod name starts. A killed
worker's claimed records come back when their 2 s lease runs out; only those can have run
twice, so the log's duplicates are bounded by what the victims held at the kills.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

import psycopg
import pytest
from worker_helpers import (
    Fleet,
    WorkerProcess,
    drain_then_stop,
    enqueue_keys,
    fleet_fixture,  # noqa: F401 - the fixture `fleet`
    in_flight,
    queue_counts,
    wait_until,
)

FLOW = "chaos_flow"
RECORDS = 20_000
WORKERS = 6
KILLS = 10
BATCH = 50
# Per-record work, so the run lasts long enough to be killed into (tens of seconds).
WORK_SECONDS = "0.006"

pytestmark = pytest.mark.slow


def completed(conn: psycopg.Connection) -> int:
    row = conn.execute(
        "SELECT count(*) FROM processing_history WHERE flow_name = %s", (FLOW,)
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_sigkill_loses_nothing_and_duplicates_only_what_victims_held(
    fleet: Fleet, dsn: str, conn: psycopg.Connection, tmp_path: Path
) -> None:
    log = tmp_path / "effects.log"
    env = {"FLOWFLEET_TEST_LOG": str(log), "FLOWFLEET_TEST_SLEEP": WORK_SECONDS}
    enqueue_keys(conn, FLOW, range(RECORDS))
    ids = {row[0] for row in conn.execute("SELECT id FROM processing_queue")}
    assert len(ids) == RECORDS

    def start(name: str) -> WorkerProcess:
        return fleet.start(
            FLOW,
            "processors.effects:append_log",
            dsn,
            name=name,
            lease_seconds=2,
            args=["--batch-size", str(BATCH), "--grace-seconds", "5"],
            env=env,
        )

    live = [start(f"chaos-{i}") for i in range(WORKERS)]
    rng = random.Random(20_000)
    # victim -> the payload keys it held in 'processing' right after it died
    held_at_kill: dict[str, list[str]] = {}
    started = time.monotonic()

    for kill in range(KILLS):
        # Kills spread over the run: the i-th once about i/(KILLS+2) of the work is done.
        threshold = RECORDS * (kill + 1) // (KILLS + 2)
        wait_until(lambda t=threshold: completed(conn) >= t, 120, 0.05, f"{threshold} completions")
        counts = queue_counts(conn, FLOW)
        assert counts["pending"] + counts["processing"] > 0, "the work ran out before the kills"
        victim = rng.choice([w for w in live if w.alive()])
        victim.kill()
        # A statement the victim sent just before dying still commits on the server;
        # give it a moment so the count below sees the victim's final state.
        time.sleep(0.2)
        held_at_kill[victim.name] = in_flight(conn, victim.name)
        live.remove(victim)
        live.append(start(f"chaos-r{kill}"))

    drain_then_stop(conn, FLOW, live, 180)
    elapsed = time.monotonic() - started

    # Exactly once in the queue: every record in the history once, none left, none lost.
    assert conn.execute("SELECT count(*) FROM processing_queue").fetchone() == (0,)
    history = conn.execute(
        "SELECT id, payload->>'k', retry_count FROM processing_history WHERE flow_name = %s",
        (FLOW,),
    ).fetchall()
    assert len(history) == RECORDS
    assert {row[0] for row in history} == ids
    assert sorted(int(row[1]) for row in history) == list(range(RECORDS))
    # Coming back from a dead worker spends no retry.
    assert {row[2] for row in history} == {0}

    # At least once in the effect log, and only the victims' records more than once.
    executions = Counter(log.read_text().split())
    assert set(executions) == {str(k) for k in range(RECORDS)}
    held = Counter(key for keys in held_at_kill.values() for key in keys)
    over = {key: n - 1 for key, n in executions.items() if n > 1}
    assert all(extra <= held[key] for key, extra in over.items()), {
        key: (extra, held[key]) for key, extra in over.items() if extra > held[key]
    }
    duplicates = sum(executions.values()) - RECORDS
    bound = sum(held.values())
    assert 0 <= duplicates <= bound, (duplicates, bound)
    # The kills hit real work: some victim died holding records.
    assert bound > 0
    print(
        f"chaos: {RECORDS} records, {KILLS} kills in {elapsed:.1f}s; "
        f"{duplicates} duplicate effects, bound {bound}"
    )

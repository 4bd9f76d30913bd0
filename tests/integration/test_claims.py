"""Many OS processes claim from one flow: every record exactly once, none lost."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psycopg

from flowfleet import queue

RECORDS = 20_000
PROCESSES = 8
FLOW = "survey_processor"

# Half the claimers complete with the combined statement, half claim then complete; each
# waits at a start line so that all of them race for the same rows.
CLAIMER = r"""
import sys, time
from pathlib import Path
import psycopg
from flowfleet import queue

dsn, flow, instance, out, go, mode = sys.argv[1:7]
conn = psycopg.connect(dsn, autocommit=True)
conn.execute("SET TIME ZONE 'UTC'")
Path(out + ".ready").touch()
deadline = time.monotonic() + 60
while not Path(go).exists():
    if time.monotonic() > deadline:
        sys.exit("start signal never came")
    time.sleep(0.005)
claimed = []
batch = queue.claim(conn, flow, instance, 50, 120)
while batch:
    claimed.extend(r.id for r in batch)
    if mode == "combined":
        batch = queue.complete_and_claim(conn, batch, flow, instance, 50, 120)
    else:
        done = queue.complete(conn, batch)
        assert sorted(done) == sorted(r.id for r in batch), "lost a claim it held"
        batch = queue.claim(conn, flow, instance, 50, 120)
Path(out).write_text("\n".join(map(str, claimed)))
"""


def test_eight_processes_claim_every_record_exactly_once(
    conn: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    assert queue.enqueue(conn, FLOW, ({"n": i} for i in range(RECORDS))) == RECORDS
    # A neighbouring flow the claimers must not touch.
    assert queue.enqueue(conn, "other_flow", [{"n": i} for i in range(50)]) == 50
    all_ids = {
        row[0]
        for row in conn.execute("SELECT id FROM processing_queue WHERE flow_name = %s", (FLOW,))
    }
    assert len(all_ids) == RECORDS

    go = tmp_path / "go"
    outs = [tmp_path / f"claimer-{i}" for i in range(PROCESSES)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CLAIMER,
                dsn,
                FLOW,
                f"pod-{i}",
                str(out),
                str(go),
                "combined" if i % 2 else "separate",
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, out in enumerate(outs)
    ]
    try:
        deadline = time.monotonic() + 60
        while not all(Path(f"{out}.ready").exists() for out in outs):
            assert all(p.poll() is None for p in procs), "a claimer died before the start"
            assert time.monotonic() < deadline, "claimers never got ready"
            time.sleep(0.01)
        go.touch()
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()

    per_process = [[int(x) for x in out.read_text().split()] for out in outs]
    claimed = [i for ids in per_process for i in ids]
    assert len(claimed) == len(set(claimed)), "a record was claimed twice"
    assert set(claimed) == all_ids, "a record was lost"
    assert sum(1 for ids in per_process if ids) > 1, "only one process got any work"

    history = conn.execute(
        "SELECT count(*), count(DISTINCT id) FROM processing_history WHERE flow_name = %s",
        (FLOW,),
    ).fetchone()
    assert history == (RECORDS, RECORDS)
    left = conn.execute(
        "SELECT count(*) FROM processing_queue WHERE flow_name = %s", (FLOW,)
    ).fetchone()
    assert left == (0,)

    # Each history row names the process that claimed it.
    for i, ids in enumerate(per_process):
        stamped = conn.execute(
            "SELECT count(*) FROM processing_history WHERE flow_instance_id = %s AND id = ANY(%s)",
            (f"pod-{i}", ids),
        ).fetchone()
        assert stamped == (len(ids),)

    other = conn.execute(
        "SELECT status, count(*) FROM processing_queue WHERE flow_name = 'other_flow'"
        " GROUP BY status"
    ).fetchall()
    assert other == [("pending", 50)]


def test_claim_takes_only_pending_ready_rows_of_its_flow(conn: psycopg.Connection) -> None:
    queue.enqueue(conn, "a", [{"n": i} for i in range(5)])
    queue.enqueue(conn, "b", [{"n": i} for i in range(5)])
    first = queue.claim(conn, "a", "w1", 3, 60)
    assert len(first) == 3
    assert {r.payload["n"] for r in first} == {0, 1, 2}
    assert all(r.retry_count == 0 and r.priority == 0 for r in first)
    assert len({r.claim_token for r in first}) == 1  # one token per claim statement

    second = queue.claim(conn, "a", "w2", 10, 60)
    assert {r.payload["n"] for r in second} == {3, 4}
    assert second[0].claim_token != first[0].claim_token
    assert queue.claim(conn, "a", "w3", 10, 60) == []

    rows = conn.execute(
        "SELECT flow_instance_id, count(*) FROM processing_queue"
        " WHERE flow_name = 'a' AND status = 'processing' GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert rows == [("w1", 3), ("w2", 2)]
    assert queue.stats(conn, "b")["b"]["pending_records"] == 5


def test_complete_and_claim_with_nothing_done_is_a_plain_claim(conn: psycopg.Connection) -> None:
    queue.enqueue(conn, "f", [{"n": i} for i in range(4)])
    batch = queue.complete_and_claim(conn, [], "f", "w", 2, 60)
    assert len(batch) == 2
    batch = queue.complete_and_claim(conn, batch, "f", "w", 2, 60)
    assert len(batch) == 2
    assert queue.complete_and_claim(conn, batch, "f", "w", 2, 60) == []
    assert conn.execute("SELECT count(*) FROM processing_history").fetchone() == (4,)
    assert conn.execute("SELECT count(*) FROM processing_queue").fetchone() == (0,)


def test_heartbeat_extends_only_our_leases(conn: psycopg.Connection) -> None:
    queue.enqueue(conn, "f", [{"n": 1}, {"n": 2}])
    batch = queue.claim(conn, "f", "w", 2, 1)
    before = dict(
        conn.execute("SELECT id, lease_expires_at FROM processing_queue ORDER BY id").fetchall()
    )
    assert queue.heartbeat(conn, batch, 600) == 2
    after = dict(
        conn.execute("SELECT id, lease_expires_at FROM processing_queue ORDER BY id").fetchall()
    )
    for record_id, expires in after.items():
        assert (expires - before[record_id]).total_seconds() > 500
    assert queue.heartbeat(conn, [], 600) == 0


def test_release_hands_records_back_without_spending_a_retry(conn: psycopg.Connection) -> None:
    queue.enqueue(conn, "f", [{"n": 1}, {"n": 2}])
    batch = queue.claim(conn, "f", "w", 2, 60)
    assert sorted(queue.release(conn, batch)) == sorted(r.id for r in batch)
    rows = conn.execute(
        "SELECT status, retry_count, flow_instance_id, claim_token, claimed_at"
        " FROM processing_queue"
    ).fetchall()
    assert rows == [("pending", 0, None, None, None)] * 2
    assert queue.release(conn, batch) == []  # the token is spent
    again = queue.claim(conn, "f", "w2", 2, 60)
    assert sorted(r.id for r in again) == sorted(r.id for r in batch)

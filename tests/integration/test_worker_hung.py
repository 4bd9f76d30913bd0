"""A record that hangs past --record-timeout-seconds is treated like a crash: its lease
runs out, it comes back counted as abandoned, and /healthz asks for a restart."""

from __future__ import annotations

import psycopg
from worker_helpers import (
    Fleet,
    enqueue_keys,
    fleet_fixture,  # noqa: F401 - the fixture `fleet`
    wait_until,
)

FLOW = "hung_flow"


def test_hung_record_is_abandoned_and_liveness_fails(
    fleet: Fleet, dsn: str, conn: psycopg.Connection
) -> None:
    enqueue_keys(conn, FLOW, [0], sleep=60)
    worker = fleet.start(
        FLOW,
        "processors.effects:sleepy",
        dsn,
        name="hangs",
        http=True,
        lease_seconds=2,
        args=["--record-timeout-seconds", "1"],
    )
    worker.wait_http()
    answer = wait_until(
        lambda: (a := worker.get("/healthz")).status == 503 and a, 20, 0.2, "liveness to fail"
    )
    assert "stuck" in answer.body
    row = wait_until(
        lambda: conn.execute(
            "SELECT status, abandoned_count, retry_count FROM processing_queue"
            " WHERE flow_name = %s AND abandoned_count > 0",
            (FLOW,),
        ).fetchone(),
        20,
        0.2,
        "the hung record to come back",
    )
    # Back for another worker (this one's claim loop is still stuck in it), no retry spent.
    assert row[1:] == (1, 0)
    worker.kill()  # what the kubelet does after failed liveness probes

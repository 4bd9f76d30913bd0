"""A poison result or error fails its record alone: whatever a processor raises or
returns, that record is retried and then failed with a stored message saying what was
wrong, and its batch-mates complete.

Each poison used to make the failure (or completion) statement itself fail: PostgreSQL
text cannot hold NUL, UTF-8 cannot encode a lone surrogate, and formatting an exception
whose ``__str__`` raises raised again. The whole batch was then released and claimed
again forever, ``retry_count`` never moving and the innocent records never completing.
"""

from __future__ import annotations

import psycopg
import pytest
from worker_helpers import (
    Fleet,
    drain_then_stop,
    fleet_fixture,  # noqa: F401 - the fixture `fleet`
)

from flowfleet import queue

FLOW = "poison_flow"
MAX_RETRIES = 1
# What each stored message must say about its poison.
POISONS = {
    "nul": "a NUL \\x00 in the message",
    "unprintable": "UnprintableError: <str() of the exception raised RuntimeError>",
    "surrogate_error": "a lone surrogate \\udc80 in the message",
    "surrogate_result": "lone surrogate (U+D800)",
    "surrogate_key": "lone surrogate (U+DFFF)",
}


@pytest.mark.parametrize(
    "entrypoint", ["processors.faults:poison", "processors.faults:poison_in_transaction"]
)
def test_each_poison_fails_alone_while_its_batch_mates_complete(
    fleet: Fleet, dsn: str, conn: psycopg.Connection, entrypoint: str
) -> None:
    records: list[dict[str, object]] = []
    for k in range(30):
        record: dict[str, object] = {"k": k, "result": k % 2 == 0}
        if k % 6 == 1:
            record["poison"] = list(POISONS)[k // 6]
        records.append(record)
    queue.enqueue(conn, FLOW, records)
    # One batch holds every record: the poisons share it with all the innocent ones.
    worker = fleet.start(
        FLOW,
        entrypoint,
        dsn,
        args=["--batch-size", "30", "--max-retries", str(MAX_RETRIES)],
    )
    drain_then_stop(conn, FLOW, [worker], 60)

    failed = dict(
        conn.execute(
            "SELECT payload->>'poison', error_message FROM processing_queue"
            " WHERE flow_name = %s AND status = 'failed' AND retry_count = %s",
            (FLOW, MAX_RETRIES),
        ).fetchall()
    )
    assert set(failed) == set(POISONS), failed
    for kind, says in POISONS.items():
        assert says in failed[kind], (kind, failed[kind])
    assert conn.execute("SELECT count(*) FROM processing_queue").fetchone() == (len(POISONS),)
    completed = conn.execute(
        "SELECT (payload->>'k')::int, result FROM processing_history WHERE flow_name = %s"
        " ORDER BY 1",
        (FLOW,),
    ).fetchall()
    innocent = [r for r in records if "poison" not in r]
    assert [k for k, _ in completed] == [r["k"] for r in innocent]
    assert all(result == ({"k": k} if k % 2 == 0 else None) for k, result in completed)
    # Each batch ran once and the retry once: no batch was released and claimed again.
    assert not worker.logged("connection lost"), worker.stderr()[-3000:]
    assert not worker.logged("claim loop error"), worker.stderr()[-3000:]

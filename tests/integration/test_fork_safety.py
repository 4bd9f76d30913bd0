"""A program that uses the pool and then forks (multiprocessing's default on Linux,
gunicorn and Celery prefork workers): the children must never touch the parent's pooled
connections, and the parent's pool must keep working."""

from __future__ import annotations

import multiprocessing
import os

import psycopg

from flowfleet.database import DatabaseManager
from flowfleet.distributed import DistributedProcessor

FLOW = "forked_flow"
RECORDS = 400
CLAIMERS = 8

# Set by the parent before it forks: the children inherit it, as a module-level
# DistributedProcessor in a user's program would be inherited.
_inherited: DistributedProcessor | None = None


def claim_until_empty(_: int) -> tuple[int, list[int], list[bool]]:
    """In a forked child: claim and complete through the seed API until nothing is left."""
    assert _inherited is not None
    ids: list[int] = []
    answers: list[bool] = []
    while batch := _inherited.claim_records_batch(FLOW, 10):
        for record in batch:
            ids.append(record["id"])
            answers.append(_inherited.mark_record_completed(record["id"], {"pid": os.getpid()}))
    return os.getpid(), ids, answers


def test_forked_claimers_use_their_own_connections(
    db: DatabaseManager, conn: psycopg.Connection
) -> None:
    global _inherited
    dp = DistributedProcessor(db)
    assert dp.add_records_to_queue(FLOW, [{"n": n} for n in range(RECORDS)]) == RECORDS
    # Several connections open in the parent's pool at the moment of the fork.
    with db.connection() as a, db.connection() as b:
        a.execute("SELECT 1")
        b.execute("SELECT 1")
    parent_pool = db.pool
    assert dp.get_queue_status(FLOW)["pending_records"] == RECORDS

    _inherited = dp
    context = multiprocessing.get_context("fork")
    with context.Pool(CLAIMERS) as children:
        try:
            answers = children.map_async(claim_until_empty, range(CLAIMERS)).get(timeout=60)
        finally:
            children.terminate()
    _inherited = None

    completed = [record_id for _, ids, _ in answers for record_id in ids]
    assert all(ok for _, _, oks in answers for ok in oks)
    assert len(completed) == RECORDS
    assert len(set(completed)) == RECORDS, "a record was completed twice"
    assert {pid for pid, _, _ in answers} - {os.getpid()}, "no child did any work"

    # The parent's own pool survived the children: same pool, and it still answers.
    assert db.pool is parent_pool
    status = dp.get_queue_status(FLOW)
    assert status["completed_records"] == RECORDS
    assert status["pending_records"] == status["processing_records"] == 0
    history = conn.execute(
        "SELECT count(*), count(DISTINCT id) FROM processing_history WHERE flow_name = %s",
        (FLOW,),
    ).fetchone()
    assert history == (RECORDS, RECORDS)

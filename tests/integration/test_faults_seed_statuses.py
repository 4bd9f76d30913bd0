"""Rows whose status is none of the four, in a table adopted from the seed, are counted.

A site that dropped the seed's CHECK constraint to add statuses of its own (``cancelled``),
or wrote others by hand (``PENDING``, ``''``), saw those rows vanish from ``status`` and
``health`` totals without a word. ``queue.stats`` counts them as ``other_records``;
``status`` and ``health`` count them in ``total_records`` and report ``other_records``
where there are any. Completed rows the seed's own SQL still writes in place count as
completed.
"""

from __future__ import annotations

import psycopg

from flowfleet import queue
from flowfleet.database import DatabaseManager
from flowfleet.distributed import DistributedProcessor
from flowfleet.migrate import migrate

SEED_TABLE_WITHOUT_CHECK = """
CREATE TABLE processing_queue (
    id SERIAL PRIMARY KEY,
    flow_name VARCHAR(100) NOT NULL,
    payload JSONB NOT NULL,
    status VARCHAR(20) DEFAULT 'pending',
    flow_instance_id VARCHAR(100),
    claimed_at TIMESTAMP,
    completed_at TIMESTAMP,
    error_message TEXT,
    retry_count INTEGER DEFAULT 0,
    created_at TIMESTAMP DEFAULT NOW(),
    updated_at TIMESTAMP DEFAULT NOW()
);
"""


def test_statuses_outside_the_four_are_counted_in_status_and_health(empty_dsn: str) -> None:
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute(SEED_TABLE_WITHOUT_CHECK)
        conn.execute(
            "INSERT INTO processing_queue (flow_name, payload, status) VALUES"
            " ('f', '{}', 'pending'), ('f', '{}', 'cancelled'), ('f', '{}', 'PENDING'),"
            " ('f', '{}', ''), ('g', '{}', 'cancelled'), ('g', '{}', 'failed')"
        )
        migrate(conn)
        # The seed's mark_record_completed, run by its own code after the migration.
        conn.execute(
            "INSERT INTO processing_queue (flow_name, payload, status) VALUES"
            " ('f', '{}', 'completed')"
        )
        flows = queue.stats(conn)
        assert flows["f"]["other_records"] == 3
        assert flows["f"]["completed_records"] == 1
        assert flows["g"]["other_records"] == 1
        assert queue.stats(conn, "f", completed=False)["f"]["other_records"] == 3

    manager = DatabaseManager("queue", connection_string=empty_dsn)
    try:
        processor = DistributedProcessor(manager)
        one = processor.get_queue_status("f")
        assert (one["pending_records"], one["other_records"], one["total_records"]) == (1, 3, 5)
        totals = processor.health_check()["queue_status"]
        assert totals["other_records"] == 4
        assert totals["total_records"] == 7
        assert totals["by_flow"]["g"]["total_records"] == 2
    finally:
        manager.close()

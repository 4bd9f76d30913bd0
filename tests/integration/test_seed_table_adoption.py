"""An existing user's database: the seed's own processing_queue, with rows in every status,
is adopted by `flowfleet migrate` without losing a row."""

from __future__ import annotations

import psycopg

from flowfleet import queue, sql
from flowfleet.migrate import migrate

# Verbatim from the seed document's "Database Schema".
SEED_TABLE = """
CREATE TABLE processing_queue (
    id SERIAL PRIMARY KEY,
    flow_name VARCHAR(100) NOT NULL,
    payload JSONB NOT NULL,
    status VARCHAR(20) DEFAULT 'pending'
        CHECK (status IN ('pending', 'processing', 'completed', 'failed')),
    flow_instance_id VARCHAR(100),
    claimed_at TIMESTAMP,
    completed_at TIMESTAMP,
    error_message TEXT,
    retry_count INTEGER DEFAULT 0,
    created_at TIMESTAMP DEFAULT NOW(),
    updated_at TIMESTAMP DEFAULT NOW()
);
"""


def test_migrate_adopts_the_seed_table(empty_dsn: str) -> None:
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        conn.execute(SEED_TABLE)
        conn.execute(
            "INSERT INTO processing_queue (flow_name, payload, status, flow_instance_id,"
            " claimed_at, completed_at, error_message, retry_count) VALUES"
            " ('f', jsonb_build_object('n', 1), 'pending', NULL, NULL, NULL, NULL, 0),"
            " ('f', jsonb_build_object('n', 2), 'processing', 'old-pod',"
            "  NOW() - INTERVAL '3 hours', NULL, NULL, 0),"
            " ('f', jsonb_build_object('n', 3), 'completed', 'old-pod',"
            "  NOW() - INTERVAL '1 hour', NOW(), NULL, 0),"
            " ('f', jsonb_build_object('n', 4), 'failed', 'old-pod', NULL, NULL, 'boom', 3),"
            " ('f', jsonb_build_object('n', 5), 'pending', NULL, NULL, NULL, NULL, NULL)"
        )
        assert migrate(conn) == [m.version for m in sql.migrations()]

        # Nothing lost: every record is somewhere, completed ones in history.
        rows = conn.execute(
            "SELECT payload->>'n', status FROM processing_records ORDER BY 1"
        ).fetchall()
        assert rows == [
            ("1", "pending"),
            ("2", "processing"),
            ("3", "completed"),
            ("4", "failed"),
            ("5", "pending"),
        ]
        # The old claim, 3 hours old, is past the seed's 2-hour timeout: it comes back.
        assert len(queue.release_orphans(conn)) == 1
        # Its worker may have died of it: it runs alone first, then the rest as a batch.
        alone = queue.claim(conn, "f", "new-pod", 10, 60)
        assert [r.payload["n"] for r in alone] == [2]
        claimed = alone + queue.claim(conn, "f", "new-pod", 10, 60)
        assert sorted(r.payload["n"] for r in claimed) == [1, 2, 5]
        assert all(r.retry_count == 0 for r in claimed)
        assert len(queue.complete(conn, claimed)) == 3
        # The seed's own query on failed records still answers.
        errors = conn.execute(
            "SELECT error_message, COUNT(*) as count FROM processing_queue"
            " WHERE status = 'failed' GROUP BY error_message"
        ).fetchall()
        assert errors == [("boom", 1)]
        # New records get ids after the old ones.
        queue.enqueue(conn, "f", [{"n": 6}])
        new_id = conn.execute("SELECT max(id) FROM processing_queue").fetchone()
        assert new_id is not None and new_id[0] > 5

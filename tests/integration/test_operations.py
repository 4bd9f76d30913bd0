"""Operations: queue status, cleanup, dedup, ordering, delays, history, many databases."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from flowfleet import queue
from flowfleet.database import DatabaseManager
from flowfleet.distributed import DistributedProcessor
from flowfleet.throwaway import ThrowawayPostgres

STATUS_KEYS = {
    "flow_name",
    "pending_records",
    "processing_records",
    "completed_records",
    "failed_records",
    "total_records",
}
COUNT_KEYS = STATUS_KEYS - {"flow_name"}


@pytest.fixture
def processor(db: DatabaseManager) -> DistributedProcessor:
    return DistributedProcessor(db, instance_id="pod", max_retries=0)


def populate(processor: DistributedProcessor) -> None:
    """flow a: 6 pending, 1 processing, 2 completed, 1 failed; b: 3 pending;
    c: 3 completed and nothing live."""
    processor.add_records_to_queue("a", [{"n": i} for i in range(10)])
    processor.add_records_to_queue("b", [{"n": i} for i in range(3)])
    processor.add_records_to_queue("c", [{"n": i} for i in range(3)])
    claimed = processor.claim_records_batch("a", 4)
    assert processor.mark_record_completed(claimed[0]["id"]) is True
    assert processor.mark_record_completed(claimed[1]["id"]) is True
    assert processor.mark_record_failed(claimed[2]["id"], "bad") == "failed"
    for record in processor.claim_records_batch("c", 10):
        processor.mark_record_completed(record["id"])


def test_queue_status_of_one_flow(processor: DistributedProcessor) -> None:
    populate(processor)
    status = processor.get_queue_status("a")
    assert set(status) == STATUS_KEYS
    assert status == {
        "flow_name": "a",
        "pending_records": 6,
        "processing_records": 1,
        "completed_records": 2,
        "failed_records": 1,
        "total_records": 10,
    }
    assert processor.get_queue_status("c") == {
        "flow_name": "c",
        "pending_records": 0,
        "processing_records": 0,
        "completed_records": 3,
        "failed_records": 0,
        "total_records": 3,
    }
    assert processor.get_queue_status("never_used") == {
        "flow_name": "never_used",
        "pending_records": 0,
        "processing_records": 0,
        "completed_records": 0,
        "failed_records": 0,
        "total_records": 0,
    }


def test_queue_status_of_all_flows(processor: DistributedProcessor) -> None:
    populate(processor)
    status = processor.get_queue_status()
    assert set(status) == COUNT_KEYS | {"by_flow"}
    assert {k: status[k] for k in COUNT_KEYS} == {
        "pending_records": 9,
        "processing_records": 1,
        "completed_records": 5,
        "failed_records": 1,
        "total_records": 16,
    }
    assert list(status["by_flow"]) == ["a", "b", "c"]
    for flow, counts in status["by_flow"].items():
        one = processor.get_queue_status(flow)
        del one["flow_name"]
        assert counts == one


def test_queue_status_of_an_empty_queue(processor: DistributedProcessor) -> None:
    assert processor.get_queue_status() == {
        "pending_records": 0,
        "processing_records": 0,
        "completed_records": 0,
        "failed_records": 0,
        "total_records": 0,
        "by_flow": {},
    }


def test_cleanup_completed_records(
    processor: DistributedProcessor, conn: psycopg.Connection
) -> None:
    populate(processor)
    assert processor.cleanup_completed_records(older_than_hours=1) == 0
    assert processor.cleanup_completed_records() == 0  # the default keeps a week
    time.sleep(0.01)
    assert processor.cleanup_completed_records(older_than_hours=0) == 5
    assert conn.execute("SELECT count(*) FROM processing_history").fetchone() == (0,)
    assert processor.get_queue_status("a")["completed_records"] == 0
    # Live records are untouched.
    assert processor.get_queue_status("a")["pending_records"] == 6
    assert processor.get_queue_status("a")["failed_records"] == 1


def test_cleanup_completed_records_keeps_recent_ones(
    processor: DistributedProcessor, conn: psycopg.Connection
) -> None:
    populate(processor)
    conn.execute(
        "UPDATE processing_history SET completed_at = LOCALTIMESTAMP - interval '3 hours'"
        " WHERE flow_name = 'c'"
    )
    assert processor.cleanup_completed_records(older_than_hours=2) == 3
    assert processor.get_queue_status("a")["completed_records"] == 2


def test_dedup_key_skips_live_duplicates(
    processor: DistributedProcessor, conn: psycopg.Connection
) -> None:
    add = processor.add_records_to_queue
    assert add("f", [{"k": 1}, {"k": 2}], dedup_key="k") == 2
    assert add("f", [{"k": 2, "v": "new"}, {"k": 3}], dedup_key="k") == 1
    assert add("f", [{"k": 4}, {"k": 4}], dedup_key="k") == 1  # within one call, too
    assert add("g", [{"k": 1}], dedup_key="k") == 1  # keys are per flow
    assert add("f", [{"other": 1}, {"other": 1}], dedup_key="k") == 2  # no key, no dedup
    payload_of_2 = conn.execute(
        "SELECT payload FROM processing_queue WHERE flow_name = 'f' AND dedup_key = '2'"
    ).fetchone()
    assert payload_of_2 == ({"k": 2},)  # the first one stays

    # A function of the record works as the key.
    assert add("h", [{"a": 1, "b": 2}, {"a": 1, "b": 3}], dedup_key=lambda r: r["a"]) == 1

    # Once the record leaves the live queue (completed), its key may come back.
    worker = DistributedProcessor(processor.queue_db, instance_id="w")
    for record in worker.claim_records_batch("f", 100):
        if record["payload"].get("k") == 1:
            assert worker.mark_record_completed(record["id"]) is True
    assert add("f", [{"k": 1}], dedup_key="k") == 1
    assert add("f", [{"k": 1}], dedup_key="k") == 0


def test_priority_first_then_fifo(conn: psycopg.Connection) -> None:
    queue.enqueue(conn, "f", [{"name": "a"}, {"name": "b"}])
    queue.enqueue(conn, "f", [{"name": "c"}], priority=5)
    queue.enqueue(conn, "f", [{"name": "d"}, {"name": "e"}], priority=1)
    queue.enqueue(conn, "f", [{"name": "f"}], priority=5)
    queue.enqueue(conn, "f", [{"name": "g"}], priority=-1)
    queue.enqueue(conn, "f", [{"name": "h"}])
    order = []
    while batch := queue.claim(conn, "f", "pod", 1, 60):
        order.append(batch[0].payload["name"])
        assert batch[0].priority == {"c": 5, "f": 5, "d": 1, "e": 1, "g": -1}.get(
            batch[0].payload["name"], 0
        )
    assert order == ["c", "f", "d", "e", "a", "b", "h", "g"]


def test_priority_decides_which_records_a_batch_gets(conn: psycopg.Connection) -> None:
    queue.enqueue(conn, "f", [{"n": i} for i in range(100)])
    queue.enqueue(conn, "f", [{"urgent": 1}, {"urgent": 2}], priority=10)
    batch = queue.claim(conn, "f", "pod", 3, 60)
    payloads = sorted(map(str, (r.payload for r in batch)))
    assert payloads == sorted(map(str, [{"urgent": 1}, {"urgent": 2}, {"n": 0}]))


def test_delay_makes_records_unclaimable_until_due(processor: DistributedProcessor) -> None:
    processor.add_records_to_queue("f", [{"late": True}], delay_seconds=1.0, priority=9)
    processor.add_records_to_queue("f", [{"now": True}])
    first = processor.claim_records_batch("f", 10)
    assert [r["payload"] for r in first] == [{"now": True}]
    assert processor.claim_records_batch("f", 10) == []
    with processor.queue_db.connection() as conn:
        counts = queue.stats(conn, "f")["f"]
    assert counts["pending_records"] == 1 and counts["ready_records"] == 0
    assert processor.get_queue_status("f")["pending_records"] == 1
    time.sleep(1.1)
    later = processor.claim_records_batch("f", 10)
    assert [r["payload"] for r in later] == [{"late": True}]


def test_completed_records_in_the_processing_records_view(
    processor: DistributedProcessor, conn: psycopg.Connection
) -> None:
    processor.add_records_to_queue("f", [{"n": 1}, {"n": 2}, {"n": 3}])
    one, two, three = sorted(processor.claim_records_batch("f", 3), key=lambda r: r["id"])
    assert processor.mark_record_completed(one["id"], {"score": 0.9}) is True
    assert processor.mark_record_completed(two["id"]) is True
    rows = conn.execute(
        "SELECT id, status, flow_instance_id, payload, result, completed_at IS NOT NULL"
        " FROM processing_records WHERE flow_name = 'f' ORDER BY id"
    ).fetchall()
    assert rows == [
        (one["id"], "completed", "pod", {"n": 1}, {"score": 0.9}, True),
        (two["id"], "completed", "pod", {"n": 2}, None, True),
        (three["id"], "processing", "pod", {"n": 3}, None, False),
    ]
    # The seed's own style of question still answers.
    done = conn.execute(
        "SELECT count(*) FROM processing_records WHERE status = 'completed'"
    ).fetchone()
    assert done == (2,)


# -- many databases ----------------------------------------------------------------------


@pytest.fixture
def second_postgres(pg_server: ThrowawayPostgres, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Another database on the same server, with a table of source data."""
    name = f"source_{id(monkeypatch)}"
    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    dsn = pg_server.dsn(name)
    with psycopg.connect(dsn, autocommit=True) as setup:
        setup.execute("CREATE TABLE customers (id text PRIMARY KEY, tier int)")
        setup.execute("INSERT INTO customers VALUES ('CUST-001', 1), ('CUST-002', 2)")
    monkeypatch.setenv("SOURCE_PG_CONNECTION_STRING", dsn)
    yield dsn
    DatabaseManager("source_pg").close()
    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def sqlite_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'survey.db'}"
    monkeypatch.setenv("SURVEYHUB_CONNECTION_STRING", url)
    yield url
    DatabaseManager("SurveyHub").close()


def test_execute_query_reaches_other_databases_by_name(
    db: DatabaseManager, second_postgres: str, sqlite_source: str
) -> None:
    rows = db.execute_query("source_pg", "SELECT id, tier FROM customers ORDER BY id")
    assert rows == [("CUST-001", 1), ("CUST-002", 2)]
    assert db.execute_query(
        "source_pg", "SELECT tier FROM customers WHERE id = %s", ["CUST-002"]
    ) == [(2,)]
    assert db.execute_query("source_pg", "UPDATE customers SET tier = 3") == []
    assert db.execute_query("source_pg", "SELECT DISTINCT tier FROM customers") == [(3,)]
    # The queue database itself is untouched and answers by its own name.
    assert db.execute_query("rpa_db", "SELECT to_regclass('customers') IS NULL") == [(True,)]
    assert db.execute_query(None, "SELECT current_database()") == db.execute_query(
        "rpa_db", "SELECT current_database()"
    )

    assert db.execute_query("SurveyHub", "CREATE TABLE surveys (id TEXT, score INT)") == []
    db.execute_query("SurveyHub", "INSERT INTO surveys VALUES (?, ?)", ("SURV-1", 7))
    db.execute_query(
        "SurveyHub", "INSERT INTO surveys VALUES (:id, :score)", {"id": "S2", "score": 8}
    )
    assert db.execute_query("SurveyHub", "SELECT id, score FROM surveys ORDER BY id") == [
        ("S2", 8),
        ("SURV-1", 7),
    ]


def test_health_check_lists_queue_and_source_databases(
    db: DatabaseManager, second_postgres: str, sqlite_source: str
) -> None:
    for source in ("source_pg", "SurveyHub"):
        health = DistributedProcessor(db, DatabaseManager(source)).health_check()
        assert health["status"] == "healthy"
        assert set(health["databases"]) == {"rpa_db", source}
        assert all(d["status"] == "healthy" for d in health["databases"].values())
    health = DistributedProcessor(db, "SurveyHub").health_check()
    assert health["databases"]["SurveyHub"]["type"] == "sqlite"
    assert health["databases"]["rpa_db"]["type"] == "postgresql"


def test_a_source_database_down_degrades_health(
    db: DatabaseManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKEN_SRC_CONNECTION_STRING", f"sqlite:///{tmp_path}/no/such/dir/x.db")
    try:
        health = DistributedProcessor(db, "broken_src").health_check()
    finally:
        DatabaseManager("broken_src").close()
    assert health["status"] == "degraded"
    assert health["databases"]["broken_src"]["status"] == "unhealthy"
    assert "broken_src" in health["databases"]["broken_src"]["error"]
    assert health["databases"]["rpa_db"]["status"] == "healthy"


def test_health_of_an_unmigrated_queue_database(empty_dsn: str) -> None:
    manager = DatabaseManager("bare", connection_string=empty_dsn)
    try:
        health = DistributedProcessor(manager).health_check()
    finally:
        manager.close()
    assert health["status"] == "unhealthy"
    assert "flowfleet migrate" in health["error"]
    assert health["databases"]["bare"]["status"] == "healthy"  # reachable, just empty


def test_production_environment_resolves_production_variable_first(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFECT_ENVIRONMENT", "production")
    monkeypatch.setenv("OPS_DB_CONNECTION_STRING", "postgresql://nobody@127.0.0.1:1/nowhere")
    monkeypatch.setenv(
        "DEVELOPMENT_GLOBAL_OPS_DB_CONNECTION_STRING", "postgresql://x@127.0.0.1:1/y"
    )
    monkeypatch.setenv("PRODUCTION_GLOBAL_OPS_DB_CONNECTION_STRING", dsn)
    manager = DatabaseManager("ops_db")
    try:
        assert manager.dsn == dsn
        assert manager.execute_query("ops_db", "SELECT 41 + 1") == [(42,)]
        processor = DistributedProcessor("ops_db", instance_id="prod-pod")
        assert processor.add_records_to_queue("prod_flow", [{"n": 1}]) == 1
        assert processor.get_queue_status("prod_flow")["pending_records"] == 1
    finally:
        manager.close()
    with psycopg.connect(dsn) as direct:
        assert direct.execute(
            "SELECT count(*) FROM processing_queue WHERE flow_name = 'prod_flow'"
        ).fetchone() == (1,)

"""The flowfleet command against a real database: its output is the library's answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from flowfleet import queue
from flowfleet.database import DatabaseManager
from flowfleet.distributed import DistributedProcessor
from flowfleet.sql import latest_version

FLOWFLEET = str(Path(sys.executable).with_name("flowfleet"))


def run_cli(
    *args: str, stdin: str | None = None, cwd: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    environ = dict(os.environ)
    environ.pop("PREFECT_ENVIRONMENT", None)
    environ.pop("FLOWFLEET_DSN", None)
    environ.update(env)
    return subprocess.run(
        [FLOWFLEET, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env=environ,
        cwd=cwd,
    )


@pytest.fixture
def busy(db: DatabaseManager) -> DistributedProcessor:
    processor = DistributedProcessor(db, instance_id="pod", max_retries=0)
    processor.add_records_to_queue("surveys", [{"n": i} for i in range(8)])
    processor.add_records_to_queue("files", [{"n": i} for i in range(2)])
    claimed = processor.claim_records_batch("surveys", 3)
    processor.mark_record_completed(claimed[0]["id"])
    processor.mark_record_failed(claimed[1]["id"], "bad")
    return processor


def test_status_json_is_get_queue_status(dsn: str, busy: DistributedProcessor) -> None:
    one = run_cli("status", "surveys", "--json", "--dsn", dsn)
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout) == busy.get_queue_status("surveys")
    assert json.loads(one.stdout)["pending_records"] == 5

    every = run_cli("status", "--json", "--dsn", dsn)
    assert every.returncode == 0, every.stderr
    assert json.loads(every.stdout) == busy.get_queue_status()
    assert set(json.loads(every.stdout)["by_flow"]) == {"surveys", "files"}


def test_status_reads_the_dsn_and_named_databases_from_the_environment(
    dsn: str, busy: DistributedProcessor
) -> None:
    expected = busy.get_queue_status("files")
    by_env = run_cli("status", "files", "--json", FLOWFLEET_DSN=dsn)
    assert by_env.returncode == 0, by_env.stderr
    assert json.loads(by_env.stdout) == expected
    by_name = run_cli("status", "files", "--json", "--db", "src", SRC_CONNECTION_STRING=dsn)
    assert json.loads(by_name.stdout) == expected
    default = run_cli("status", "files", "--json", RPA_DB_CONNECTION_STRING=dsn)
    assert json.loads(default.stdout) == expected


def test_status_table(dsn: str, busy: DistributedProcessor) -> None:
    result = run_cli("status", "--dsn", dsn, COLUMNS="200")
    assert result.returncode == 0, result.stderr
    rows = {
        cells[1]: cells[2:7]
        for line in result.stdout.splitlines()
        if (cells := [c.strip() for c in line.split("│")]) and len(cells) == 8
    }
    assert rows == {
        "files": ["2", "0", "0", "0", "2"],
        "surveys": ["5", "1", "1", "1", "8"],
        "all": ["7", "1", "1", "1", "10"],
    }
    one = run_cli("status", "files", "--dsn", dsn, COLUMNS="200")
    assert "surveys" not in one.stdout and "files" in one.stdout


def test_health_json_on_a_migrated_database(dsn: str) -> None:
    result = run_cli("health", "--json", "--dsn", dsn)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["status"] == "healthy"
    assert report["schema_version"] == latest_version()
    assert report["databases"]["queue"]["status"] == "healthy"
    assert report["queue_status"]["total_records"] == 0


def test_health_on_an_empty_database_says_to_migrate(empty_dsn: str) -> None:
    result = run_cli("health", "--json", "--dsn", empty_dsn)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["status"] == "unhealthy"
    assert "flowfleet migrate" in report["error"]

    text = run_cli("health", "--dsn", empty_dsn)
    assert text.returncode == 1
    assert "status: unhealthy" in text.stdout
    assert "run `flowfleet migrate`" in text.stdout
    assert "Traceback" not in text.stdout + text.stderr

    migrated = run_cli("migrate", "--dsn", empty_dsn)
    assert migrated.returncode == 0
    assert run_cli("health", "--dsn", empty_dsn).returncode == 0


def test_enqueue_options(dsn: str, conn: psycopg.Connection) -> None:
    lines = '{"id": "a"}\n{"id": "b"}\n'
    assert run_cli("enqueue", "f", "--dsn", dsn, "--priority", "4", stdin=lines).returncode == 0
    result = run_cli("enqueue", "f", "--dsn", dsn, "--dedup-key", "id", stdin=lines)
    assert result.stdout.strip() == "enqueued 2 records for f"
    again = run_cli("enqueue", "f", "--dsn", dsn, "--dedup-key", "id", stdin=lines)
    assert again.returncode == 0
    assert again.stdout.strip() == "enqueued 0 records for f"
    delayed = run_cli("enqueue", "g", "--dsn", dsn, "--delay", "3600", stdin='{"x": 1}')
    assert delayed.returncode == 0

    rows = conn.execute(
        "SELECT flow_name, priority, dedup_key, count(*) FROM processing_queue"
        " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
    ).fetchall()
    assert rows == [("f", 0, "a", 1), ("f", 0, "b", 1), ("f", 4, None, 2), ("g", 0, None, 1)]
    assert queue.claim(conn, "g", "pod", 10, 60) == []  # due in an hour


def test_cleanup_command(dsn: str, db: DatabaseManager, conn: psycopg.Connection) -> None:
    processor = DistributedProcessor(db, instance_id="pod")
    processor.add_records_to_queue("f", [{"n": i} for i in range(4)])
    claimed = processor.claim_records_batch("f", 3)
    processor.mark_record_completed(claimed[0]["id"])

    kept = run_cli("cleanup", "--dsn", dsn)
    assert kept.returncode == 0, kept.stderr
    assert kept.stdout.splitlines() == ["released 0 orphaned records"]

    time.sleep(0.01)
    swept = run_cli(
        "cleanup", "--timeout-hours", "0", "--completed-older-than-hours", "0", "--dsn", dsn
    )
    assert swept.returncode == 0, swept.stderr
    assert swept.stdout.splitlines() == [
        "released 2 orphaned records",
        "deleted 1 completed records",
    ]
    assert conn.execute(
        "SELECT status, retry_count, count(*) FROM processing_queue GROUP BY 1, 2"
    ).fetchall() == [("pending", 0, 3)]
    assert conn.execute("SELECT count(*) FROM processing_history").fetchone() == (0,)


def test_help_lists_the_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("migrate", "enqueue", "status", "cleanup", "health"):
        assert command in result.stdout

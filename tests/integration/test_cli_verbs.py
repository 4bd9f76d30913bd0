"""The verbs a newcomer reaches for, on real PostgreSQL: --version, failed, status per
instance, status --watch --json as a stream, requeue that says what it found, worker --help
with its defaults."""

from __future__ import annotations

import json
import os
import select
import subprocess
from importlib.metadata import version

import psycopg
import pytest
from test_cli import FLOWFLEET, run_cli

from flowfleet import defaults
from flowfleet.database import DatabaseManager
from flowfleet.distributed import DistributedProcessor


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"flowfleet {version('flowfleet')}"


def test_failed_lists_id_retries_and_error(dsn: str, db: DatabaseManager) -> None:
    processor = DistributedProcessor(db, instance_id="pod", max_retries=1)
    processor.add_records_to_queue("f", [{"n": i} for i in range(4)])
    processor.add_records_to_queue("other", [{"n": 9}])
    first = processor.claim_records_batch("f", 4)
    # Retried once (retry_count 1), then failed; the second error quotes a password.
    for record in first[:2]:
        assert processor.mark_record_failed(record["id"], "boom") == "pending"
    with db.connection() as conn:
        conn.execute("UPDATE processing_queue SET available_at = LOCALTIMESTAMP")
    again = processor.claim_records_batch("f", 4)
    assert {r["id"] for r in again} == {first[0]["id"], first[1]["id"]}
    processor.mark_record_failed(first[0]["id"], "KeyError: 'answers'\nTraceback line")
    processor.mark_record_failed(first[1]["id"], "connect postgresql://u:hunter2@db/x failed")

    table = run_cli("failed", "f", "--dsn", dsn, COLUMNS="200")
    assert table.returncode == 0, table.stderr
    lines = {
        cells[1]: cells[2:6]
        for line in table.stdout.splitlines()
        if (cells := [c.strip() for c in line.split("│")]) and len(cells) == 7
    }
    assert lines[str(first[0]["id"])][0] == "1"
    assert lines[str(first[0]["id"])][3] == "KeyError: 'answers'"
    assert lines[str(first[1]["id"])][3] == "connect postgresql://u:***@db/x failed"
    assert set(lines) == {str(first[0]["id"]), str(first[1]["id"])}
    assert "2 failed records of f" in table.stdout
    assert "hunter2" not in table.stdout

    as_json = run_cli("failed", "f", "--json", "--limit", "1", "--dsn", dsn)
    assert as_json.returncode == 0, as_json.stderr
    rows = json.loads(as_json.stdout)
    assert [(r["id"], r["retry_count"], r["error_message"]) for r in rows] == [
        (first[0]["id"], 1, "KeyError: 'answers'\nTraceback line")
    ]

    none = run_cli("failed", "other", "--dsn", dsn)
    assert none.returncode == 0 and none.stdout.strip() == "no failed records of other"


def test_status_per_instance_on_real_claims(
    dsn: str, db: DatabaseManager, conn: psycopg.Connection
) -> None:
    DistributedProcessor(db).add_records_to_queue("f", [{"n": i} for i in range(10)])
    DistributedProcessor(db, instance_id="pod-a").claim_records_batch("f", 3)
    DistributedProcessor(db, instance_id="pod-b").claim_records_batch("f", 2)
    # pod-b stopped renewing: its lease ran out, and status says so.
    conn.execute(
        "UPDATE processing_queue SET lease_expires_at = LOCALTIMESTAMP - interval '1 minute'"
        " WHERE flow_instance_id = 'pod-b'"
    )

    table = run_cli("status", "--dsn", dsn, COLUMNS="200")
    assert table.returncode == 0, table.stderr
    rows = {
        cells[2]: cells[1:5]
        for line in table.stdout.splitlines()
        if (cells := [c.strip() for c in line.split("│")]) and len(cells) == 7
    }
    assert rows["pod-a"] == ["f", "pod-a", "3", "0"]
    assert rows["pod-b"] == ["f", "pod-b", "2", "2"]

    plain = run_cli("status", "f", "--json", "--dsn", dsn)
    assert "by_instance" not in json.loads(plain.stdout)  # --json stays get_queue_status()
    detailed = run_cli("status", "f", "--json", "--instances", "--dsn", dsn)
    assert detailed.returncode == 0, detailed.stderr
    by_instance = json.loads(detailed.stdout)["by_instance"]
    assert [
        (r["instance_id"], r["processing_records"], r["expired_records"]) for r in by_instance
    ] == [("pod-a", 3, 0), ("pod-b", 2, 2)]


def read_line(process: subprocess.Popen[str], timeout: float) -> str:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, "no line within the interval: output not flushed"
    return process.stdout.readline()


def test_status_watch_json_is_one_object_per_line_per_interval(
    dsn: str, db: DatabaseManager
) -> None:
    processor = DistributedProcessor(db)
    processor.add_records_to_queue("f", [{"n": 1}])
    env = {**os.environ, "FLOWFLEET_DSN": dsn}
    env.pop("PREFECT_ENVIRONMENT", None)
    watcher = subprocess.Popen(
        [FLOWFLEET, "status", "f", "--watch", "--json", "--interval", "0.3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        first = json.loads(read_line(watcher, 30))
        processor.add_records_to_queue("f", [{"n": 2}, {"n": 3}])
        lines = [json.loads(read_line(watcher, 10)) for _ in range(3)]
    finally:
        watcher.terminate()
        watcher.wait(10)
    assert first["pending_records"] == 1 and first["flow_name"] == "f"
    assert lines[-1]["pending_records"] == 3
    stamps = [first["timestamp"], *(line["timestamp"] for line in lines)]
    assert stamps == sorted(stamps) and len(set(stamps)) == 4
    assert set(first) == {*processor.get_queue_status("f"), "timestamp"}


def test_requeue_says_what_it_found(
    dsn: str, db: DatabaseManager, conn: psycopg.Connection
) -> None:
    processor = DistributedProcessor(db, instance_id="pod", max_retries=0)
    processor.add_records_to_queue("f", [{"n": i} for i in range(3)])
    processor.add_records_to_queue("g", [{"n": 0}])
    claimed = processor.claim_records_batch("f", 1)
    processor.mark_record_failed(claimed[0]["id"], "bad")
    ids = dict(conn.execute("SELECT flow_name, max(id) FROM processing_queue GROUP BY 1"))
    pending_id, g_id = ids["f"], ids["g"]

    nothing = run_cli("requeue", "f", "--id", "99999", "--dsn", dsn)
    assert nothing.returncode == 1
    assert nothing.stdout.strip() == "requeued 0 failed records of f"
    assert nothing.stderr.strip() == "flowfleet: not requeued: 99999 not found"

    mixed = run_cli(
        "requeue", "f", "--id", str(claimed[0]["id"]), "--id", str(pending_id),
        "--id", str(g_id), "--dsn", dsn,
    )  # fmt: skip
    assert mixed.returncode == 1
    assert mixed.stdout.strip() == "requeued 1 failed records of f"
    assert mixed.stderr.splitlines() == [
        f"flowfleet: left alone: {pending_id} is pending, not failed",
        f"flowfleet: not requeued: {g_id} belongs to flow 'g'",
    ]
    assert processor.get_queue_status("f")["failed_records"] == 0

    # Run again: the record requeued above is pending now, noted, and not an error.
    again = run_cli("requeue", "f", "--id", str(claimed[0]["id"]), "--dsn", dsn)
    assert again.returncode == 0
    assert (
        again.stderr.strip() == f"flowfleet: left alone: {claimed[0]['id']} is pending, not failed"
    )


def test_requeue_refuses_id_with_all_failed(dsn: str, db: DatabaseManager) -> None:
    processor = DistributedProcessor(db, instance_id="pod", max_retries=0)
    processor.add_records_to_queue("f", [{"n": i} for i in range(2)])
    for record in processor.claim_records_batch("f", 2):
        processor.mark_record_failed(record["id"], "bad")
    result = run_cli("requeue", "f", "--all-failed", "--id", "1", "--dsn", dsn)
    assert result.returncode == 2
    assert result.stderr.strip() == "flowfleet: give --id ID (repeatable) or --all-failed, not both"
    assert processor.get_queue_status("f")["failed_records"] == 2


def test_worker_help_shows_the_defaults() -> None:
    result = run_cli("worker", "--help", COLUMNS="250")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for option, value in [
        ("Records per claim", defaults.BATCH_SIZE),
        ("Claim loops in this process", defaults.CONCURRENCY),
        ("Claim lease, renewed every third of it", defaults.LEASE_SECONDS),
        ("Drain time on SIGTERM", defaults.GRACE_SECONDS),
        ("Poll when no NOTIFY comes", defaults.POLL_SECONDS),
        ("Health/metrics port; 0 = off", defaults.HTTP_PORT),
        ("Retries before failed", defaults.MAX_RETRIES),
        ("prefect or plain", defaults.RUNNER),
    ]:
        assert f"{option} (default {value})" in text, option


@pytest.mark.parametrize("command", [["status"], ["status", "f"], ["failed", "f"]])
def test_unmigrated_database_gives_the_migrate_hint(empty_dsn: str, command: list[str]) -> None:
    result = run_cli(*command, "--dsn", empty_dsn)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "no flowfleet schema" in result.stderr
    assert "run `flowfleet migrate`" in result.stderr
    # ... the same advice the worker gives at start-up.
    assert "Traceback" not in result.stderr

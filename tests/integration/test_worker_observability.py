"""Logs and metrics an operator can use: the log level, the processor's own lines in the
worker's JSON, retries as fields, one-line outage messages, and /metrics with the
standard process and Python series, no `_created` series, and claims counted once."""

from __future__ import annotations

import signal
import time

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from worker_helpers import (
    Fleet,
    WorkerProcess,
    enqueue_keys,
    fleet_fixture,  # noqa: F401 - the fixture `fleet`
    queue_counts,
    run_cli,
    wait_until,
)

from flowfleet import queue
from flowfleet.database import DatabaseManager
from flowfleet.errors import DatabaseUnavailableError
from flowfleet.throwaway import free_port


def metric_names(worker: WorkerProcess) -> set[str]:
    body = worker.get("/metrics").body
    return {s.name for family in text_string_to_metric_families(body) for s in family.samples}


def sample(worker: WorkerProcess, name: str, flow: str) -> float | None:
    body = worker.get("/metrics").body
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name == name and s.labels.get("flow") == flow:
                return s.value
    return None


def test_processor_lines_kept_in_json_and_retries_logged_as_fields(
    fleet: Fleet, dsn: str, conn: psycopg.Connection
) -> None:
    flow = "logs_flow"
    queue.enqueue(conn, flow, [{"k": k, "poison": k == 2} for k in range(4)])
    worker = fleet.start(
        flow,
        "processors.chatty:process",
        dsn,
        args=["--max-retries", "2", "--exit-when-empty"],
        env={"DEVELOPMENT_GLOBAL_RETRY_BACKOFF_SECONDS": "0.02"},
    )
    assert worker.wait_exit(60) == 0, worker.stderr()
    entries = worker.logs()
    # Every stderr line is a JSON entry.
    assert len(entries) == len(worker.stderr().splitlines())

    mine = [e for e in entries if e["logger"] == "chatty"]
    assert {e["msg"] for e in mine if e["level"] == "info"} == {"record 0", "record 1", "record 3"}
    assert all((e["flow"], e["instance"]) == (flow, worker.name) for e in mine)
    assert [e["level"] for e in mine if e["msg"] == "poison ahead"] == ["warning"] * 3

    record_id = conn.execute(
        "SELECT id FROM processing_queue WHERE flow_name = %s", (flow,)
    ).fetchone()
    assert record_id is not None
    retries = [e for e in entries if e.get("record_id") == record_id[0]]
    assert [(e["level"], e["attempt"], e.get("delay")) for e in retries] == [
        ("info", 1, 0.02),
        ("info", 2, 0.04),
        ("warning", 3, None),
    ]
    assert retries[0]["msg"] == (
        f"record {record_id[0]}: attempt 1 of 3 failed (ValueError: poison record 2); "
        "retrying in at most 0.02s"
    )
    assert retries[-1]["msg"].startswith(f"record {record_id[0]} failed for good")


def test_log_level_option_and_setting(fleet: Fleet, dsn: str, conn: psycopg.Connection) -> None:
    flow = "log_level_flow"
    queue.enqueue(conn, flow, [{"k": k, "poison": k == 1} for k in range(3)])
    quiet = fleet.start(
        flow,
        "processors.chatty:process",
        dsn,
        args=["--log-level", "warning", "--max-retries", "0", "--exit-when-empty"],
    )
    assert quiet.wait_exit(60) == 0, quiet.stderr()
    # The processor's warning and the worker's, nothing less severe.
    assert {(e["logger"], e["level"]) for e in quiet.logs()} == {
        ("chatty", "warning"),
        ("flowfleet.batch", "warning"),
    }, quiet.stderr()

    enqueue_keys(conn, flow, range(3, 5))
    verbose = fleet.start(
        flow,
        "processors.chatty:process",
        dsn,
        args=["--exit-when-empty"],
        env={"DEVELOPMENT_GLOBAL_WORKER_LOG_LEVEL": "DEBUG"},
    )
    assert verbose.wait_exit(60) == 0, verbose.stderr()
    debug = [e for e in verbose.logs() if e["level"] == "debug" and e["logger"] == "chatty"]
    assert {e["msg"] for e in debug} == {"payload {'k': 3}", "payload {'k': 4}"}

    code, _, stderr = run_cli(
        ["worker", flow, "--entrypoint", "processors.chatty:process", "--log-level", "loud"]
    )
    assert code != 0
    err = stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "log_level" in err and "--log-level" in err, err


def test_metrics_standard_series_no_created_claims_counted_once(
    fleet: Fleet, dsn: str, conn: psycopg.Connection
) -> None:
    flow = "metrics_flow"
    total, poison = 20, {4, 9}
    queue.enqueue(conn, flow, [{"k": k, "poison": k in poison} for k in range(total)])
    worker = fleet.start(
        flow, "processors.effects:poison", dsn, http=True, args=["--max-retries", "2"]
    )
    worker.wait_http()
    wait_until(
        lambda: queue_counts(conn, flow)["failed"] == len(poison), 30, 0.2, "the retries to end"
    )
    names = metric_names(worker)
    assert {n for n in names if n.startswith("process_")} >= {
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_start_time_seconds",
        "process_open_fds",
    }
    assert {"python_info", "python_gc_collections_total"} <= names
    assert not [n for n in names if n.endswith("_created")]
    # Each record's first claim counts as claimed; its retries' claims as reclaimed.
    assert sample(worker, "flowfleet_records_claimed_total", flow) == total
    assert sample(worker, "flowfleet_records_reclaimed_total", flow) == 2 * len(poison)
    assert sample(worker, "flowfleet_records_retried_total", flow) == 2 * len(poison)
    worker.send(signal.SIGTERM)
    assert worker.wait_exit(15) == 0, worker.stderr()


def test_an_unreachable_database_is_named_once_per_line() -> None:
    db = DatabaseManager("queue", connection_string=f"postgresql://u:pw@127.0.0.1:{free_port()}/q")
    with pytest.raises(DatabaseUnavailableError) as raised:
        db.connect()
    # The lease keeper and the claim loops describe the error they caught again.
    said = str(db.unavailable(raised.value))
    assert said.count("cannot reach database") == 1, said
    assert said == str(raised.value)
    assert "pw" not in said


def depth_exported(worker: WorkerProcess, flow: str) -> float | None:
    body = worker.get("/metrics").body
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name == "flowfleet_queue_depth" and s.labels == {
                "flow": flow,
                "status": "pending",
            }:
                return s.value
    return None


def test_queue_depth_exported_by_one_worker_at_a_time(
    fleet: Fleet, dsn: str, conn: psycopg.Connection
) -> None:
    """Summed over pods, the depth is the depth: one worker of the flow exports it, and
    another takes over when that one stops."""
    flow = "depth_flow"
    workers = [
        fleet.start(flow, "processors.effects:sleepy", dsn, http=True, args=["--batch-size", "1"])
        for _ in range(2)
    ]
    for worker in workers:
        worker.wait_logged("worker started")
    # Records that will not be claimed for an hour: the depth stays put.
    conn.execute(
        "INSERT INTO processing_queue (flow_name, payload, available_at)"
        " SELECT %s, jsonb_build_object('k', k), LOCALTIMESTAMP + interval '1 hour'"
        " FROM generate_series(1, 7) AS k",
        (flow,),
    )

    def exporters() -> list[WorkerProcess]:
        found = [w for w in workers if w.alive() and depth_exported(w, flow) is not None]
        return found if found and all(depth_exported(w, flow) == 7 for w in found) else []

    first = wait_until(exporters, 20, 0.2, "a worker to export the depth")
    assert len(first) == 1
    # Stays one: the keepers sweep every lease (2 s here); a later sweep adds no exporter.
    time.sleep(2.5)
    assert exporters() == first
    first[0].send(signal.SIGTERM)
    assert first[0].wait_exit(15) == 0, first[0].stderr()
    (other,) = [w for w in workers if w is not first[0]]
    wait_until(lambda: exporters() == [other], 20, 0.2, "the other worker to take over")
    other.send(signal.SIGTERM)
    assert other.wait_exit(15) == 0, other.stderr()

"""Bad input is refused whole, with a message that says where; odd names are just data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from flowfleet import queue
from flowfleet.database import DatabaseManager
from flowfleet.distributed import DistributedProcessor
from flowfleet.errors import DatabaseConfigError, InvalidRecordError

FLOWFLEET = str(Path(sys.executable).with_name("flowfleet"))
SECRET = "s3cretpw"  # noqa: S105 - a fake password the output must not show


def count(conn: psycopg.Connection) -> int:
    found = conn.execute("SELECT count(*) FROM processing_queue").fetchone()
    assert found is not None
    return int(found[0])


def run_cli(*args: str, stdin: str | None = None, env: dict[str, str] | None = None):
    return subprocess.run(
        [FLOWFLEET, *args], input=stdin, capture_output=True, text=True, timeout=120, env=env
    )


# -- payloads ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, {"priority": 3}, {"dedup_key": "k"}, {"delay_seconds": 1.0}],
    ids=["copy", "priority", "dedup", "delay"],
)
def test_non_object_payload_rejects_the_whole_call(conn: psycopg.Connection, options: dict) -> None:
    for bad in ([1, 2], "a string", 42, None, 1.5, False):
        for index in (0, 2, 5):  # first, middle, last
            records: list[object] = [{"k": i} for i in range(5)]
            records.insert(index, bad)
            with pytest.raises(InvalidRecordError, match=rf"^record {index}: "):
                queue.enqueue(conn, "flow", records, **options)
            assert count(conn) == 0, (bad, index)
    # The same call with the bad record removed goes through: the refusal was the record's.
    assert queue.enqueue(conn, "flow", [{"k": i} for i in range(5)], **options) == 5


def test_processor_rejects_whole_batch(db: DatabaseManager, conn: psycopg.Connection) -> None:
    processor = DistributedProcessor(db)
    records = [{"n": i} for i in range(1000)] + [["not", "an", "object"]]
    with pytest.raises(InvalidRecordError, match="record 1000"):
        processor.add_records_to_queue("flow", records)
    with pytest.raises(InvalidRecordError, match="record 2"):
        processor.add_records_to_queue("flow", [{"a": 1}, {"b": 2}, {"nan": float("nan")}])
    assert count(conn) == 0
    assert processor.get_queue_status("flow")["total_records"] == 0


def test_database_check_backs_up_the_client_check(conn: psycopg.Connection) -> None:
    # Writers that bypass flowfleet cannot store a non-object payload either.
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO processing_queue (flow_name, payload) VALUES ('f', '[1]')")


@pytest.mark.parametrize("name", ["", " ", "x" * 101, "line\nbreak", "tab\tname"])
def test_bad_flow_name_is_refused_before_anything_is_written(
    conn: psycopg.Connection, name: str
) -> None:
    with pytest.raises(InvalidRecordError):
        queue.enqueue(conn, name, [{"a": 1}])
    assert count(conn) == 0


def test_empty_batch_enqueues_nothing(conn: psycopg.Connection) -> None:
    assert queue.enqueue(conn, "flow", []) == 0
    assert queue.enqueue(conn, "flow", iter([]), dedup_key="k") == 0
    assert count(conn) == 0


PAYLOAD = {
    "text": "tab\there\nnewline\r\\backslash \\N \\t 'single' \"double\" ; -- not sql",
    "unicode": "ñandú 🚀 中文",
    "nested": {"list": [1, 2.5, None, True, False], "empty": {}},
    "big": 2**70,
    "copy_terminator": "\\.",
}


@pytest.mark.parametrize("options", [{}, {"priority": 2}], ids=["copy", "staged"])
def test_payloads_round_trip_exactly(conn: psycopg.Connection, options: dict) -> None:
    assert queue.enqueue(conn, "flow", [PAYLOAD, {"plain": 1}], **options) == 2
    claimed = queue.claim(conn, "flow", "pod", 5, 60)
    assert [r.payload for r in sorted(claimed, key=lambda r: r.id)] == [PAYLOAD, {"plain": 1}]


def test_dedup_keys_round_trip_exactly(conn: psycopg.Connection) -> None:
    key = "a\tb\\c\nd\re \\N"
    assert queue.enqueue(conn, "flow", [{"k": key}], dedup_key="k") == 1
    assert conn.execute("SELECT dedup_key FROM processing_queue").fetchone() == (key,)
    assert queue.enqueue(conn, "flow", [{"k": key}], dedup_key="k") == 0


# -- names that look like SQL -------------------------------------------------------------

ODD_NAMES = [
    "x'; DROP TABLE processing_queue; --",
    '"quoted"',
    "robert'); --",
    "back\\slash \\N",
    "percent %s %(flow_name)s {}",
    "ñandú 🚀",
    "$1 $$ dollar $$",
]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_odd_flow_names_are_data(db: DatabaseManager, conn: psycopg.Connection, name: str) -> None:
    processor = DistributedProcessor(db, instance_id="pod")
    processor.add_records_to_queue("neighbour", [{"n": 0}])
    assert processor.add_records_to_queue(name, [{"n": i} for i in range(4)]) == 4
    assert processor.add_records_to_queue(name, [{"n": 9}], priority=1, dedup_key="n") == 1
    claimed = processor.claim_records_batch(name, 3)
    assert len(claimed) == 3
    assert all(r["flow_name"] == name for r in claimed)
    assert {"n": 9} in [r["payload"] for r in claimed]  # priority 1 goes first
    assert processor.mark_record_completed(claimed[0]["id"]) is True
    assert processor.mark_record_failed(claimed[1]["id"], "no", claim_token=None) == "pending"

    assert processor.get_queue_status(name) == {
        "flow_name": name,
        "pending_records": 3,
        "processing_records": 1,
        "completed_records": 1,
        "failed_records": 0,
        "total_records": 5,
    }
    everything = processor.get_queue_status()
    assert set(everything["by_flow"]) == {name, "neighbour"}
    assert everything["by_flow"][name]["total_records"] == 5
    assert conn.execute(
        "SELECT count(*) FROM processing_queue WHERE flow_name = %s", (name,)
    ).fetchone() == (4,)
    assert conn.execute("SELECT to_regclass('processing_queue') IS NOT NULL").fetchone() == (True,)
    assert processor.get_queue_status("neighbour")["pending_records"] == 1


def test_odd_flow_name_through_the_cli(dsn: str, db: DatabaseManager) -> None:
    name = ODD_NAMES[0]
    # The CLI enqueues only names the DistributedFlow CRD accepts; the Python API takes
    # any name as data, and the CLI still reads such a flow's status.
    enq = run_cli("enqueue", name, "-", "--dsn", dsn, stdin='{"a": 1}\n{"a": 2}\n')
    assert enq.returncode == 2 and "is not a flow name" in enq.stderr
    DistributedProcessor(db).add_records_to_queue(name, [{"a": 1}, {"a": 2}])
    status = run_cli("status", name, "--json", "--dsn", dsn)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout) == DistributedProcessor(db).get_queue_status(name)
    assert json.loads(status.stdout)["pending_records"] == 2


# -- unknown and unreachable databases ---------------------------------------------------


def test_unknown_database_names_both_variables(db: DatabaseManager) -> None:
    for attempt in (
        lambda: DatabaseManager("nosuch_db"),
        lambda: DistributedProcessor("nosuch_db"),
        lambda: db.execute_query("nosuch_db", "SELECT 1"),
    ):
        with pytest.raises(DatabaseConfigError) as info:
            attempt()
        message = str(info.value)
        assert "DEVELOPMENT_GLOBAL_NOSUCH_DB_CONNECTION_STRING" in message
        assert " NOSUCH_DB_CONNECTION_STRING" in message


def test_unknown_database_through_the_cli() -> None:
    result = run_cli("status", "--db", "nosuch_db")
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "DEVELOPMENT_GLOBAL_NOSUCH_DB_CONNECTION_STRING" in lines[0]
    assert "NOSUCH_DB_CONNECTION_STRING" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


UNREACHABLE = f"postgresql://user:{SECRET}@127.0.0.1:1/db"


def test_unreachable_database_through_the_cli(tmp_path: Path) -> None:
    """One clear line naming where, no password and no traceback, for every command."""
    records = tmp_path / "records.jsonl"
    records.write_text('{"a": 1}\n')
    commands = {
        "status": ["status", "--dsn", UNREACHABLE],
        "status-json": ["status", "flow", "--json", "--dsn", UNREACHABLE],
        "migrate": ["migrate", "--dsn", UNREACHABLE],
        "cleanup": ["cleanup", "--dsn", UNREACHABLE],
        "enqueue": ["enqueue", "flow", str(records), "--dsn", UNREACHABLE],
        "health": ["health", "--json", "--dsn", UNREACHABLE],
    }
    # Each waits out a connection timeout, so they wait side by side.
    procs = {
        name: subprocess.Popen(
            [FLOWFLEET, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in commands.items()
    }
    results = {name: p.communicate(timeout=120) for name, p in procs.items()}

    # health reports on stdout and exits 1.
    out, err = results.pop("health")
    assert procs["health"].returncode == 1
    assert SECRET not in out + err
    assert "Traceback" not in out + err
    report = json.loads(out)
    assert report["status"] == "unhealthy"
    assert report["databases"]["queue"]["status"] == "unhealthy"
    assert "127.0.0.1:1/db" in report["databases"]["queue"]["error"]

    for name, (out, err) in results.items():
        assert procs[name].returncode != 0, name
        assert SECRET not in out + err, name
        assert "Traceback" not in out + err, name
        assert "127.0.0.1:1/db" in err, name
        lines = err.splitlines()
        assert len(lines) == 1, f"{name} wrote {len(lines)} lines to stderr:\n{err}"


# -- CLI enqueue input -------------------------------------------------------------------


def queued(conn: psycopg.Connection, flow: str) -> list[dict]:
    return [
        r[0]
        for r in conn.execute(
            "SELECT payload FROM processing_queue WHERE flow_name = %s ORDER BY id", (flow,)
        )
    ]


@pytest.mark.parametrize(
    ("lines", "bad_line"),
    [
        (['{"a": 1}', '{"a": 2}', "[1, 2]", '{"a": 4}'], 3),
        (['{"a": 1}', "{not json", '{"a": 3}'], 2),
        (['{"a": 1}', "", "", '"just a string"', '{"a": 5}'], 4),
        (['{"a": 1}', '{"a": 2}', "null"], 3),
        (['{"a": 1}', '{"x": NaN}'], 2),
    ],
)
def test_cli_bad_line_rejects_the_file(
    dsn: str, conn: psycopg.Connection, tmp_path: Path, lines: list[str], bad_line: int
) -> None:
    source = tmp_path / "records.jsonl"
    source.write_text("\n".join(lines) + "\n")
    result = run_cli("enqueue", "flow", str(source), "--dsn", dsn)
    assert result.returncode != 0
    assert f"line {bad_line}" in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert count(conn) == 0


def test_cli_json_array_file(dsn: str, conn: psycopg.Connection, tmp_path: Path) -> None:
    source = tmp_path / "records.json"
    source.write_text(json.dumps([{"a": 1}, {"a": 2}, {"a": 3}], indent=2))
    result = run_cli("enqueue", "arr", str(source), "--dsn", dsn)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "enqueued 3 records for arr"
    assert queued(conn, "arr") == [{"a": 1}, {"a": 2}, {"a": 3}]


def test_cli_json_array_with_a_bad_element(
    dsn: str, conn: psycopg.Connection, tmp_path: Path
) -> None:
    source = tmp_path / "records.json"
    source.write_text('[{"a": 1}, 2, {"a": 3}]')
    result = run_cli("enqueue", "arr", str(source), "--dsn", dsn)
    assert result.returncode != 0
    assert "record 1" in result.stderr
    assert count(conn) == 0


def test_cli_stdin(dsn: str, conn: psycopg.Connection) -> None:
    data = '{"a": 1}\n\n{"a": 2}\n'
    explicit = run_cli("enqueue", "in", "-", "--dsn", dsn, stdin=data)
    assert explicit.returncode == 0, explicit.stderr
    assert explicit.stdout.strip() == "enqueued 2 records for in"
    implicit = run_cli("enqueue", "in", "--dsn", dsn, stdin='[{"a": 3}]')
    assert implicit.returncode == 0, implicit.stderr
    assert queued(conn, "in") == [{"a": 1}, {"a": 2}, {"a": 3}]


def test_cli_missing_file(dsn: str, conn: psycopg.Connection, tmp_path: Path) -> None:
    result = run_cli("enqueue", "flow", str(tmp_path / "absent.jsonl"), "--dsn", dsn)
    assert result.returncode != 0
    assert "absent.jsonl" in result.stderr
    assert "Traceback" not in result.stderr
    assert count(conn) == 0

"""Absurd input to the CLI: one line naming what is wrong, a non-zero exit, nothing done;
and every message redacted, whatever path it takes."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import psycopg
import pytest
from test_cli import run_cli

from flowfleet.database import DatabaseManager
from flowfleet.distributed import DistributedProcessor


def one_line(result: object, code: int, *expected: str) -> str:
    assert result.returncode == code, result  # type: ignore[attr-defined]
    err: str = result.stderr  # type: ignore[attr-defined]
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err
    return err


def queued(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT count(*) FROM processing_queue").fetchone()
    return int(row[0]) if row else -1


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--lease-seconds", "inf"),
        ("--lease-seconds", "nan"),
        ("--lease-seconds", "1e300"),
        ("--grace-seconds", "1e300"),
        ("--poll-seconds", "-inf"),
        ("--record-timeout-seconds", "nan"),
        ("--max-retries", "1000000000000"),
    ],
)
def test_worker_refuses_absurd_numbers_naming_the_option(dsn: str, option: str, value: str) -> None:
    result = run_cli(
        "worker", "f", "--entrypoint", "flowfleet.examples:noop", "--runner", "plain",
        "--http-port", "0", option, value, "--dsn", dsn,
    )  # fmt: skip
    one_line(result, 1, f"(from option {option})", option.removeprefix("--").replace("-", "_"))


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "-inf"])
def test_cleanup_refuses_negative_and_non_finite_hours(
    dsn: str, db: DatabaseManager, value: str
) -> None:
    processor = DistributedProcessor(db, instance_id="pod")
    processor.add_records_to_queue("f", [{"n": 1}])
    processor.claim_records_batch("f", 1)
    for option in ("--timeout-hours", "--completed-older-than-hours"):
        one_line(run_cli("cleanup", option, value, "--dsn", dsn), 2, f"'{option}'")
    assert processor.get_queue_status("f")["processing_records"] == 1  # nothing released


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf"])
def test_status_watch_refuses_a_bad_interval(dsn: str, value: str) -> None:
    one_line(run_cli("status", "--watch", "--interval", value, "--dsn", dsn), 2, "'--interval'")


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_enqueue_of_deeply_nested_json_is_one_line(
    dsn: str, conn: psycopg.Connection, tmp_path: Path, depth: int
) -> None:
    nested = "[" * depth + "]" * depth
    lines = '{"ok": 1}\n{"deep": ' + nested + "}\n"
    one_line(run_cli("enqueue", "f", "-", "--dsn", dsn, stdin=lines), 1, "nested too deeply")
    array = tmp_path / "records.json"
    array.write_text('[{"ok": 1}, {"deep": ' + nested + "}]")
    one_line(run_cli("enqueue", "f", str(array), "--dsn", dsn), 1, "nested too deeply")
    assert queued(conn) == 0


def test_only_newline_ends_a_json_line(dsn: str, conn: psycopg.Connection, tmp_path: Path) -> None:
    # Raw U+2028, U+2029, U+0085 and a lone CR are legal inside a JSON string.
    texts = ["a\u2028b", "c\u2029d", "e\u0085f", "g\rh"]
    body = "".join(json.dumps({"s": t}, ensure_ascii=False) + "\r\n" for t in texts[:2])
    body += "".join(json.dumps({"s": t}, ensure_ascii=False) + "\n" for t in texts[2:3])
    source = tmp_path / "r.jsonl"
    source.write_bytes(body.encode())
    result = run_cli("enqueue", "f", str(source), "--dsn", dsn)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "enqueued 3 records for f"
    from_stdin = run_cli(
        "enqueue", "g", "-", "--dsn", dsn, stdin=json.dumps({"s": texts[0]}, ensure_ascii=False)
    )
    assert from_stdin.returncode == 0, from_stdin.stderr
    stored = [
        row[0]["s"]
        for row in conn.execute("SELECT payload FROM processing_queue ORDER BY id").fetchall()
    ]
    assert stored == [*texts[:3], texts[0]]


def test_enqueue_flow_names_follow_the_crd_rule(dsn: str, conn: psycopg.Connection) -> None:
    for name in ("survey processor", ".leading", "x" * 101, "ñandú"):
        one_line(run_cli("enqueue", name, "-", "--dsn", dsn, stdin='{"a": 1}\n'), 2, "flow name")
    assert queued(conn) == 0
    ok = run_cli("enqueue", "survey_processor.v2-a", "-", "--dsn", dsn, stdin='{"a": 1}\n')
    assert ok.returncode == 0, ok.stderr


def test_entrypoint_that_exits_at_import_is_one_line(dsn: str, tmp_path: Path) -> None:
    (tmp_path / "exits_at_import.py").write_text("import sys\nsys.exit(3)\n")
    result = run_cli(
        "worker", "f", "--entrypoint", "exits_at_import:run", "--runner", "plain",
        "--http-port", "0", "--dsn", dsn, cwd=tmp_path,
    )  # fmt: skip
    one_line(result, 1, "'exits_at_import'", "sys.exit(3)")


def test_entrypoint_import_error_is_redacted(dsn: str, tmp_path: Path) -> None:
    (tmp_path / "leaks.py").write_text(
        'raise RuntimeError("cannot reach postgresql://app:hunter2@db:5432/rpa")\n'
    )
    result = run_cli(
        "worker", "f", "--entrypoint", "leaks:run", "--runner", "plain", "--http-port", "0",
        "--dsn", dsn, cwd=tmp_path,
    )  # fmt: skip
    err = one_line(result, 1, "RuntimeError", "postgresql://app:***@db:5432/rpa")
    assert "hunter2" not in err + result.stdout


def test_a_password_given_as_a_bad_value_is_redacted(dsn: str) -> None:
    result = run_cli("status", "--interval", "postgresql://u:hunter2@h/d", "--dsn", dsn)
    one_line(result, 2, "'--interval'")
    assert "hunter2" not in result.stderr + result.stdout


def test_http_port_in_use_is_one_line(dsn: str) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))  # noqa: S104 - the worker binds every interface too
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "worker", "f", "--entrypoint", "flowfleet.examples:noop", "--runner", "plain",
            "--http-port", str(port), "--dsn", dsn,
        )  # fmt: skip
    one_line(result, 1, f"HTTP port {port} is already in use", "--http-port 0")

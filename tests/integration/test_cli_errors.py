"""The CLI's promise: any refusal is one line on stderr, never a traceback, nothing half done."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from test_bad_input import run_cli


def assert_one_line(result: object, *expected: str) -> None:
    assert result.returncode == 1, result  # type: ignore[attr-defined]
    err = result.stderr  # type: ignore[attr-defined]
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err


def count(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT count(*) FROM processing_queue").fetchone()
    return int(row[0]) if row else -1


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--priority", "40000"], "priority 40000 is outside"),
        (["--delay", "1e12"], "is outside 0.."),
        (["--delay", "-1"], "is outside 0.."),
    ],
)
def test_out_of_range_enqueue_options(
    dsn: str, conn: psycopg.Connection, tmp_path: Path, options: list[str], expected: str
) -> None:
    source = tmp_path / "r.jsonl"
    source.write_text('{"a": 1}\n')
    assert_one_line(run_cli("enqueue", "f", str(source), "--dsn", dsn, *options), expected)
    assert count(conn) == 0


def test_input_that_is_not_utf8(dsn: str, conn: psycopg.Connection, tmp_path: Path) -> None:
    source = tmp_path / "latin1.jsonl"
    source.write_bytes(b'{"a": "caf\xe9"}\n')
    assert_one_line(run_cli("enqueue", "f", str(source), "--dsn", dsn), "not UTF-8")
    assert count(conn) == 0


def test_failed_migration_changes_nothing(empty_dsn: str) -> None:
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE processing_history (id int)")  # in the way
    assert_one_line(
        run_cli("migrate", "--dsn", empty_dsn),
        "migration 0001_processing_queue failed",
        "nothing was changed",
    )
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('processing_queue')").fetchone() == (None,)
        assert conn.execute("SELECT to_regclass('flowfleet_migrations')").fetchone() == (None,)

"""Named SQL: every query the code asks for exists, migrations are numbered without gaps."""

from __future__ import annotations

import inspect
import re
from importlib import resources

import pytest

from flowfleet import database, enqueue, migrate, pooler, queue, sql

# Every query referenced as query("...") anywhere in these modules.
_CALL = re.compile(r"""query\(\s*["']([a-z_]+)["']""")


def referenced_names() -> set[str]:
    names: set[str] = set()
    for module in (queue, enqueue, migrate, database, pooler):
        names |= set(_CALL.findall(inspect.getsource(module)))
    return names


def test_every_query_the_code_uses_exists() -> None:
    names = referenced_names()
    # A guard against the regex silently matching nothing.
    assert {"claim", "complete", "complete_and_claim", "fail", "release_orphans"} <= names
    missing = names - set(sql.queries())
    assert not missing, f"queries.sql lacks {sorted(missing)}"


def test_queue_functions_cover_the_named_queries() -> None:
    expected = {
        "claim",
        "complete_and_claim",
        "complete",
        "complete_by_instance",
        "fail",
        "release",
        "heartbeat",
        "release_orphans",
        "stats_by_flow",
        "completed_by_flow",
        "cleanup_completed_batch",
        "requeue_failed",
        "enqueue_from_staging",
        "notify",
        "performance",
        "schema_version",
    }
    assert expected <= set(sql.queries())
    unused = set(sql.queries()) - referenced_names()
    assert not unused, f"queries.sql holds queries nothing uses: {sorted(unused)}"


def test_query_bodies_are_single_non_empty_statements() -> None:
    for name, body in sql.queries().items():
        assert body.strip(), name
        assert "-- name:" not in body, name
        # One statement per name: no semicolon outside comments except a trailing one.
        code = "\n".join(line.split("--", 1)[0] for line in body.splitlines())
        assert ";" not in code.rstrip().rstrip(";"), name


def test_unknown_query_name_is_named_in_the_error() -> None:
    with pytest.raises(KeyError, match="no_such_query"):
        sql.query("no_such_query")


def test_queries_are_loaded_once() -> None:
    assert sql.queries() is sql.queries()


def test_migrations_are_numbered_without_gaps() -> None:
    found = sql.migrations()
    assert found, "no migrations found"
    assert [m.version for m in found] == list(range(1, len(found) + 1))
    assert sql.latest_version() == len(found)
    for migration in found:
        assert re.fullmatch(r"[a-z0-9_]+", migration.name)
        assert migration.sql.strip()


def test_every_sql_file_is_a_migration_or_the_query_file() -> None:
    files = {
        entry.name
        for entry in resources.files("flowfleet.sql").iterdir()
        if entry.name.endswith(".sql")
    }
    migration_files = {f"{m.version:04d}_{m.name}.sql" for m in sql.migrations()}
    assert files - migration_files == {"queries.sql"}


def test_first_migration_creates_the_seed_table() -> None:
    first = sql.migrations()[0].sql
    assert "CREATE TABLE IF NOT EXISTS processing_queue" in first
    # The seed's columns keep their names (its own SQL must still run).
    for column in (
        "flow_name",
        "payload",
        "status",
        "flow_instance_id",
        "claimed_at",
        "completed_at",
        "error_message",
        "retry_count",
        "created_at",
        "updated_at",
    ):
        assert re.search(rf"^\s+{column}\s", first, re.MULTILINE), column


def test_no_query_name_is_defined_twice() -> None:
    text = resources.files(sql).joinpath("queries.sql").read_text(encoding="utf-8")
    names = re.findall(r"^-- name: (\S+)", text, re.MULTILINE)
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)

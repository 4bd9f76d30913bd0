"""Migrations: fresh equals upgraded, reruns change nothing, racing migrators apply once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from flowfleet import sql
from flowfleet.migrate import current_version, migrate
from flowfleet.throwaway import ThrowawayPostgres

FLOWFLEET = str(Path(sys.executable).with_name("flowfleet"))

CATALOG_QUERIES = {
    "columns": """
        SELECT table_name, column_name, ordinal_position, data_type, character_maximum_length,
               column_default, is_nullable, is_identity, identity_generation
          FROM information_schema.columns WHERE table_schema = 'public'
         ORDER BY table_name, ordinal_position""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'
         ORDER BY tablename, indexname""",
    "views": "SELECT viewname, definition FROM pg_views WHERE schemaname = 'public' ORDER BY 1",
    "sequences": """
        SELECT sequence_name, data_type, start_value, increment, maximum_value
          FROM information_schema.sequences WHERE sequence_schema = 'public' ORDER BY 1""",
    "constraints": """
        SELECT c.conrelid::regclass::text, c.conname, pg_get_constraintdef(c.oid)
          FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
         WHERE n.nspname = 'public' ORDER BY 1, 2""",
    "functions": """
        SELECT p.proname, pg_get_functiondef(p.oid) FROM pg_proc p
          JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public'
         ORDER BY 1""",
    "triggers": """
        SELECT event_object_table, trigger_name, action_statement
          FROM information_schema.triggers WHERE trigger_schema = 'public' ORDER BY 1, 2""",
    "migrations": "SELECT version, name FROM flowfleet_migrations ORDER BY version",
}


def catalog(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return {key: conn.execute(q).fetchall() for key, q in CATALOG_QUERIES.items()}


def pg_dump(server: ThrowawayPostgres, dsn: str) -> str:
    cmd = [str(server.bindir / "pg_dump"), "--schema-only", "--no-owner", "--no-privileges", dsn]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    # Drop comments and pg_dump's per-run \restrict key; keep every statement.
    return "\n".join(
        line
        for line in out.splitlines()
        if line.strip()
        and not line.startswith("--")
        and not line.startswith(("\\restrict", "\\unrestrict"))
    )


def schema(server: ThrowawayPostgres, dsn: str) -> tuple[dict[str, Any], str]:
    return catalog(dsn), pg_dump(server, dsn)


def new_empty(server: ThrowawayPostgres, name: str) -> str:
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name} TEMPLATE template1")
    return server.dsn(name)


@pytest.fixture
def step_dsn(pg_server: ThrowawayPostgres) -> str:
    return new_empty(pg_server, f"m_step_{os.getpid()}")


def test_fresh_equals_upgraded_step_by_step(
    pg_server: ThrowawayPostgres, empty_dsn: str, step_dsn: str
) -> None:
    latest = sql.latest_version()
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert current_version(conn) == 0
        assert migrate(conn) == list(range(1, latest + 1))
        assert current_version(conn) == latest

    with psycopg.connect(step_dsn, autocommit=True) as conn:
        # target=0 only creates the tracking table.
        assert migrate(conn, target=0) == []
        assert current_version(conn) == 0
        for version in range(1, latest + 1):
            assert migrate(conn, target=version) == [version]
            assert current_version(conn) == version
            assert migrate(conn, target=version) == []
        assert migrate(conn) == []

    fresh = schema(pg_server, empty_dsn)
    upgraded = schema(pg_server, step_dsn)
    assert fresh[0] == upgraded[0]
    assert fresh[1] == upgraded[1]
    # The dump really holds the schema (an empty comparison would prove nothing).
    assert "CREATE TABLE public.processing_queue" in fresh[1]
    assert "CREATE VIEW public.processing_records" in fresh[1]
    assert [v for v, _ in fresh[0]["migrations"]] == list(range(1, latest + 1))


def test_every_intermediate_version_upgrades_to_the_fresh_schema(
    pg_server: ThrowawayPostgres, empty_dsn: str
) -> None:
    """From each version v (with data in it), migrating to latest gives the fresh schema."""
    latest = sql.latest_version()
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        migrate(conn)
    fresh = schema(pg_server, empty_dsn)
    for start in range(1, latest + 1):
        dsn = new_empty(pg_server, f"m_from_{start}_{os.getpid()}")
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn, target=start)
            conn.execute(
                "INSERT INTO processing_queue (flow_name, payload) VALUES ('f', '{\"a\": 1}')"
            )
            assert migrate(conn) == list(range(start + 1, latest + 1))
            assert conn.execute("SELECT count(*) FROM processing_queue").fetchone() == (1,)
            conn.execute("DELETE FROM processing_queue")
        assert schema(pg_server, dsn) == fresh


def test_rerun_and_reapplied_sql_change_nothing(pg_server: ThrowawayPostgres, dsn: str) -> None:
    before = schema(pg_server, dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert migrate(conn) == []
        assert schema(pg_server, dsn) == before
        # The migration files are idempotent themselves: re-running them after the
        # tracking rows are lost neither fails nor alters the schema.
        conn.execute("DELETE FROM flowfleet_migrations")
        assert migrate(conn) == list(range(1, sql.latest_version() + 1))
    assert schema(pg_server, dsn) == before


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FLOWFLEET, *args], capture_output=True, text=True, timeout=120)


def test_concurrent_cli_migrators_apply_each_version_once(
    pg_server: ThrowawayPostgres, empty_dsn: str
) -> None:
    procs = [
        subprocess.Popen(
            [FLOWFLEET, "migrate", "--dsn", empty_dsn],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    assert [rc for rc, _, _ in results] == [0, 0, 0], results
    assert all(err == "" for _, _, err in results), results
    outs = [out for _, out, _ in results]
    latest = sql.latest_version()
    applied = [o for o in outs if o.startswith("applied migrations")]
    assert len(applied) == 1, outs
    assert applied[0].strip() == (
        f"applied migrations {', '.join(map(str, range(1, latest + 1)))};"
        f" schema at version {latest}"
    )
    assert sum("nothing to do" in o for o in outs) == 2, outs

    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT version, count(*) FROM flowfleet_migrations GROUP BY version ORDER BY 1"
        ).fetchall()
    assert rows == [(v, 1) for v in range(1, latest + 1)]

    before = schema(pg_server, empty_dsn)
    rerun = run_cli("migrate", "--dsn", empty_dsn)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.strip() == f"schema already at version {latest}; nothing to do"
    assert schema(pg_server, empty_dsn) == before


def test_cli_migrated_schema_equals_library_migrated(
    pg_server: ThrowawayPostgres, empty_dsn: str, dsn: str
) -> None:
    assert run_cli("migrate", "--dsn", empty_dsn).returncode == 0
    assert schema(pg_server, empty_dsn) == schema(pg_server, dsn)

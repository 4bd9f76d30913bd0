"""`flowfleet migrate --wait`: what a Kubernetes init container runs before the worker
starts, while the database may still be coming up."""

from __future__ import annotations

import os
import subprocess
import time

import psycopg
from test_cli import FLOWFLEET, run_cli

from flowfleet.sql import latest_version
from flowfleet.throwaway import ThrowawayPostgres


def test_migrate_wait_waits_for_the_database_then_migrates(pg_server: ThrowawayPostgres) -> None:
    name = f"late_{os.getpid()}"
    dsn = pg_server.dsn(name)  # not created yet: the server answers "does not exist"
    env = {k: v for k, v in os.environ.items() if k not in ("FLOWFLEET_DSN", "PREFECT_ENVIRONMENT")}
    migrator = subprocess.Popen(
        [FLOWFLEET, "migrate", "--wait", "--dsn", dsn],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    time.sleep(3)
    assert migrator.poll() is None, migrator.communicate()
    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    out, err = migrator.communicate(timeout=60)
    assert migrator.returncode == 0, err
    assert out.strip().endswith(f"schema at version {latest_version()}")
    assert "retrying in" in err and "Traceback" not in err
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT to_regclass('processing_queue') IS NOT NULL").fetchone() == (
            True,
        )


def test_migrate_wait_gives_up_in_one_line(pg_server: ThrowawayPostgres) -> None:
    dsn = f"postgresql://postgres:hunter2@127.0.0.1:{pg_server.port}/never_created"
    started = time.monotonic()
    result = run_cli("migrate", "--wait", "--wait-seconds", "2", "--dsn", dsn)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("flowfleet: cannot reach database") and "(waited 2s)" in last
    assert "hunter2" not in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - started < 30


def test_migrate_without_wait_fails_at_once(pg_server: ThrowawayPostgres) -> None:
    result = run_cli("migrate", "--dsn", pg_server.dsn("never_created"))
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "retrying" not in result.stderr

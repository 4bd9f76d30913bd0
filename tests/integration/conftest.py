"""A real PostgreSQL for the session; a fresh, migrated database for every test.

The schema is migrated once into a template database; each test gets a copy made by
``CREATE DATABASE … TEMPLATE`` (a file copy, milliseconds), so tests never see each
other's rows and never pay for migrations.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import psycopg
import pytest

from flowfleet.database import DatabaseManager
from flowfleet.migrate import migrate
from flowfleet.throwaway import ThrowawayPgBouncer, ThrowawayPostgres

TEMPLATE = "flowfleet_template"
_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[ThrowawayPostgres]:
    # Room for the 200 claim loops of test_pgbouncer_scale beside everything else.
    with ThrowawayPostgres(max_connections=300) as server:
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {TEMPLATE}")
        with psycopg.connect(server.dsn(TEMPLATE), autocommit=True) as conn:
            migrate(conn)
        yield server


def _new_database(server: ThrowawayPostgres, template: str) -> str:
    name = f"t_{os.getpid()}_{next(_counter)}"
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    return name


@pytest.fixture
def dsn(pg_server: ThrowawayPostgres) -> Iterator[str]:
    """A migrated database of this test's own."""
    name = _new_database(pg_server, TEMPLATE)
    yield pg_server.dsn(name)


@pytest.fixture
def empty_dsn(pg_server: ThrowawayPostgres) -> Iterator[str]:
    """A database with no flowfleet schema at all."""
    yield pg_server.dsn(_new_database(pg_server, "template1"))


@pytest.fixture
def db(dsn: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[DatabaseManager]:
    """The queue database, reachable as the seed names it: DatabaseManager('rpa_db')."""
    monkeypatch.setenv("RPA_DB_CONNECTION_STRING", dsn)
    monkeypatch.delenv("PREFECT_ENVIRONMENT", raising=False)
    manager = DatabaseManager("rpa_db")
    yield manager
    manager.close()


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("SET TIME ZONE 'UTC'")
        yield connection


@pytest.fixture(scope="session")
def pgbouncer(pg_server: ThrowawayPostgres) -> Iterator[ThrowawayPgBouncer]:
    """PgBouncer in transaction mode in front of the session's server, with few server
    connections per database, so that clients really share them."""
    with ThrowawayPgBouncer(pg_server, pool_size=3) as bouncer:
        yield bouncer


@pytest.fixture
def bouncer_dsn(dsn: str, pgbouncer: ThrowawayPgBouncer) -> str:
    """This test's database (``dsn``), reached through PgBouncer."""
    return pgbouncer.dsn(str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]))

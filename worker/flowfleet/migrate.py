"""Apply the numbered migrations, once each, safely when several migrators race."""

from __future__ import annotations

import psycopg

from flowfleet import sql

# One fixed key: every migrator of every flowfleet version serialises on it.
_LOCK_KEY = 0x666C6F77  # "flow"

_TRACKING = """
CREATE TABLE IF NOT EXISTS flowfleet_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)"""


def migrate(conn: psycopg.Connection, target: int | None = None) -> list[int]:
    """Apply pending migrations up to ``target`` (default: all). Returns versions applied.

    Runs in one transaction under a transaction-scoped advisory lock: a second migrator
    waits, then finds nothing left to do; a failure leaves the schema as it was.
    """
    applied: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        conn.execute(_TRACKING)
        done = {row[0] for row in conn.execute("SELECT version FROM flowfleet_migrations")}
        for migration in sql.migrations():
            if migration.version in done or (target is not None and migration.version > target):
                continue
            conn.execute(migration.sql.encode())
            conn.execute(
                "INSERT INTO flowfleet_migrations (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
            applied.append(migration.version)
    return applied


def current_version(conn: psycopg.Connection) -> int:
    """The schema version of this database; 0 when flowfleet was never migrated here."""
    exists = conn.execute("SELECT to_regclass('flowfleet_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return 0
    row = conn.execute(sql.query("schema_version")).fetchone()
    return int(row[0]) if row else 0

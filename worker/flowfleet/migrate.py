"""Apply the numbered migrations, once each, safely when several migrators race."""

from __future__ import annotations

import psycopg

from flowfleet import sql


def migrate(conn: psycopg.Connection, target: int | None = None) -> list[int]:
    """Apply pending migrations up to ``target`` (default: all). Returns versions applied.

    Runs in one transaction under a transaction-scoped advisory lock: a second migrator
    waits, then finds nothing left to do; a failure leaves the schema as it was.
    """
    applied: list[int] = []
    with conn.transaction():
        conn.execute(sql.query("migrations_lock"))
        conn.execute(sql.query("migrations_table"))
        done = {row[0] for row in conn.execute(sql.query("migrations_applied"))}
        for migration in sql.migrations():
            if migration.version in done or (target is not None and migration.version > target):
                continue
            conn.execute(migration.sql)
            conn.execute(
                sql.query("migration_record"),
                {"version": migration.version, "name": migration.name},
            )
            applied.append(migration.version)
    return applied


def current_version(conn: psycopg.Connection) -> int:
    """The schema version of this database; 0 when flowfleet was never migrated here."""
    exists = conn.execute(sql.query("migrations_exist")).fetchone()
    if not exists or not exists[0]:
        return 0
    row = conn.execute(sql.query("schema_version")).fetchone()
    return int(row[0]) if row else 0

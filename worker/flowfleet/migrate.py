"""Apply the numbered migrations, once each, safely when several migrators race."""

from __future__ import annotations

import psycopg

from flowfleet import sql
from flowfleet.errors import SchemaError


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
            try:
                conn.execute(migration.sql)
            except psycopg.Error as exc:
                # The transaction rolls back whole: the schema stays as it was.
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                raise SchemaError(
                    f"migration {migration.version:04d}_{migration.name} failed, nothing "
                    f"was changed: {first}"
                ) from None
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

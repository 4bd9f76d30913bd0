"""Transaction poolers (PgBouncer in transaction mode): detecting one, and setting up a
connection so that nothing assumes session state a pooler would not carry."""

from __future__ import annotations

import os

import psycopg

from flowfleet.errors import DatabaseConfigError
from flowfleet.sql import query


def session_setup(conn: psycopg.Connection) -> None:
    conn.execute(query("session_setup"))


# FLOWFLEET_PGBOUNCER: "1" when the queue database is reached through a transaction pooler
# (PgBouncer's pool_mode=transaction), "0" when it is not, unset or "auto" to detect it.
POOLER_ENV = "FLOWFLEET_PGBOUNCER"
# A direct connection (PostgreSQL itself, or PgBouncer in session mode) for LISTEN, which
# a transaction pooler cannot carry.
LISTEN_DSN_ENV = "FLOWFLEET_LISTEN_DSN"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def pooler_setting() -> bool | None:
    """True or False when FLOWFLEET_PGBOUNCER says, None to detect."""
    value = os.environ.get(POOLER_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    if value in ("", "auto"):
        return None
    raise DatabaseConfigError(f"{POOLER_ENV}={value!r}: expected 1, 0 or auto")


def configure_connection(conn: psycopg.Connection) -> bool:
    """For code that opens its own connections (the operator): through a transaction
    pooler, no server-side prepared statements and no session setup; direct, the session
    setup. Returns whether a pooler answered."""
    forced = pooler_setting()
    pooled = behind_pooler(conn) if forced is None else forced
    if pooled:
        conn.prepare_threshold = None
    else:
        session_setup(conn)
    return pooled


def behind_pooler(conn: psycopg.Connection) -> bool:
    """Whether ``conn`` reaches PostgreSQL through a pooler. The backend pid a client is
    told at connect (in BackendKeyData) is PgBouncer's own random cancel key when a pooler
    answers, and the server process's pid when PostgreSQL does."""
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    return row is not None and int(row[0]) != conn.info.backend_pid

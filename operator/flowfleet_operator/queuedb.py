"""The operator's only door to PostgreSQL, through ``flowfleet.queue`` and
``flowfleet.migrate``: per database a small bounded pool shared by every flow on it, and
one LISTEN connection for the enqueue fast path. Knows nothing of kopf.

Calls are synchronous (psycopg); the operator runs them in threads. Errors leave as
``DatabaseError`` with one redacted line.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import psycopg

from flowfleet import queue
from flowfleet.errors import SchemaError
from flowfleet.migrate import current_version, migrate
from flowfleet.pooler import configure_connection
from flowfleet.redaction import describe_dsn, redact

log = logging.getLogger("flowfleet_operator.queuedb")

# Per database, shared by every DistributedFlow on it: depth reads, migrations and claim
# releases each hold one briefly. Plus one LISTEN connection: 3 connections at most.
POOL_SIZE = 2
CONNECT_TIMEOUT_S = 5
# Completions counted over this window give status.recordsPerMinute.
RATE_WINDOW_SECONDS = 120.0


class DatabaseError(Exception):
    """A database the operator could not use; the message is one redacted line."""

    def __init__(self, message: str, reason: str = "DatabaseUnreachable") -> None:
        super().__init__(message)
        self.reason = reason


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # libpq puts the useful part (FATAL: ...) after the "connection to server" preamble.
    fatal = next((line for line in lines if "FATAL" in line), None)
    return redact(fatal or (lines[0] if lines else repr(exc)))


def _reason(exc: BaseException) -> str:
    text = str(exc)
    if "password authentication failed" in text or "no password supplied" in text:
        return "AuthenticationFailed"
    if "does not exist" in text and "database" in text:
        return "DatabaseNotFound"
    return "DatabaseUnreachable"


class Database:
    """One PostgreSQL database, named in messages by ``host:port/dbname`` only."""

    def __init__(self, dsn: str, pool_size: int = POOL_SIZE) -> None:
        self._dsn = dsn
        self.where = describe_dsn(dsn)
        self._slots = threading.BoundedSemaphore(pool_size)
        self._idle: list[psycopg.Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def _connect(self) -> psycopg.Connection:
        conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
        configure_connection(conn)  # PgBouncer in transaction mode: nothing prepared
        return conn

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        if not self._slots.acquire(timeout=CONNECT_TIMEOUT_S * 2):
            raise DatabaseError(f"{self.where}: every pooled connection is busy")
        conn: psycopg.Connection | None = None
        try:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None or conn.closed:
                conn = self._connect()
            yield conn
            with self._lock:
                if not self._closed:
                    self._idle.append(conn)
                    conn = None
        except psycopg.Error as exc:
            raise DatabaseError(f"{self.where}: {_first_line(exc)}", _reason(exc)) from None
        finally:
            if conn is not None:
                conn.close()
            self._slots.release()

    def migrate(self) -> tuple[list[int], int]:
        """Apply pending migrations; (versions applied, version now)."""
        with self.connection() as conn:
            try:
                applied = migrate(conn)
            except SchemaError as exc:  # one line already: which migration, and why
                raise DatabaseError(
                    f"{self.where}: {redact(str(exc))}", "MigrationFailed"
                ) from None
            return applied, current_version(conn)

    def schema_version(self) -> int:
        with self.connection() as conn:
            return current_version(conn)

    def depth(self, flow_names: Sequence[str]) -> dict[str, queue.FlowDepth]:
        with self.connection() as conn:
            return queue.depth_of_flows(conn, flow_names, RATE_WINDOW_SECONDS)

    def in_flight(self, flow_name: str) -> dict[str, int]:
        """Records each instance (pod) of the flow holds now."""
        with self.connection() as conn:
            rows = queue.processing_by_instance(conn, flow_name)
        return {str(r["instance_id"]): int(r["processing_records"]) for r in rows}

    def release_instance(self, flow_name: str, instance_id: str) -> list[int]:
        with self.connection() as conn:
            return queue.release_instance(conn, flow_name, instance_id)

    def listen(self, on_notify: Callable[[str], None], stop: threading.Event) -> None:
        """Until ``stop``: call ``on_notify(flow_name)`` for every enqueue on this database.
        Reconnects after errors; the periodic tick covers what a gap misses."""
        backoff = 0.5
        while not stop.is_set():
            try:
                with psycopg.connect(
                    self._dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S
                ) as conn:
                    queue.listen(conn)
                    backoff = 0.5
                    while not stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            on_notify(note.payload)
            except psycopg.Error as exc:
                log.debug("LISTEN on %s: %s", self.where, _first_line(exc))
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

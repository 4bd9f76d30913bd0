"""Named databases from the environment, pooled: the seed's ``core.database``.

A name such as ``rpa_db`` resolves, in the environment named by ``PREFECT_ENVIRONMENT``
(default ``development``), to ``{ENV}_GLOBAL_RPA_DB_CONNECTION_STRING`` and then to
``RPA_DB_CONNECTION_STRING``; ``{ENV}_GLOBAL_RPA_DB_TYPE`` gives its type. The queue
database is PostgreSQL through psycopg 3; source databases may be any SQLAlchemy URL.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from flowfleet.config import env_name, environment
from flowfleet.connstrings import (
    DRIVER_EXTRAS,
    POSTGRES_TYPES,
    check_dsn,
    missing_driver,
    resolve,
    type_of,
)
from flowfleet.errors import DatabaseConfigError, DatabaseUnavailableError
from flowfleet.pooler import (
    LISTEN_DSN_ENV,
    POOLER_ENV,
    behind_pooler,
    configure_connection,
    pooler_setting,
    session_setup,
)
from flowfleet.pools import PoolRegistry as _Registry
from flowfleet.redaction import describe_dsn, redact
from flowfleet.sql import query

# Env naming lives in config, connection strings in connstrings, pooler detection in
# pooler, redaction in its own module; re-exported for callers that import them from here.
__all__ = [
    "DRIVER_EXTRAS",
    "LISTEN_DSN_ENV",
    "POOLER_ENV",
    "DatabaseManager",
    "behind_pooler",
    "check_dsn",
    "configure_connection",
    "describe_dsn",
    "env_name",
    "environment",
    "pooler_setting",
    "redact",
    "resolve",
]

# Connection string -> reached through a transaction pooler (detected by ``_probe``).
# Single assignments of immutable values: no lock needed, and a fork may keep them.
_detected: dict[str, bool] = {}


class DatabaseManager:
    """A named database with a connection pool.

    ``DatabaseManager("rpa_db")`` reads its connection string from the environment;
    ``DatabaseManager("queue", connection_string=dsn)`` takes one directly.
    """

    def __init__(
        self,
        name: str = "rpa_db",
        *,
        connection_string: str | None = None,
        db_type: str | None = None,
        pool_max_size: int | None = None,
    ) -> None:
        if not name or not name.strip():
            raise DatabaseConfigError("a database name is required")
        self.name = name
        if connection_string is None:
            connection_string, resolved_type = resolve(name)
        else:
            resolved_type = type_of(connection_string)
        self._dsn = connection_string
        self.db_type = (db_type or resolved_type).lower()
        if self.is_postgres:
            # SQLAlchemy spells the driver into the scheme (postgresql+psycopg://);
            # libpq knows only postgresql:// and postgres://.
            scheme, sep, rest = self._dsn.partition("://")
            if sep and "+" in scheme:
                self._dsn = f"postgresql://{rest}"
            check_dsn(name, self._dsn)
        self.pool_max_size = pool_max_size or int(
            os.environ.get(env_name(environment(), "global", name, "pool_max_size"), "10")
        )

    def __repr__(self) -> str:
        return f"DatabaseManager({self.name!r}, {self.location}, type={self.db_type})"

    @property
    def is_postgres(self) -> bool:
        return self.db_type in POSTGRES_TYPES

    @property
    def location(self) -> str:
        return describe_dsn(self._dsn) if self.is_postgres else redact(self._dsn)

    @property
    def dsn(self) -> str:
        """The connection string itself: for drivers, never for messages or logs."""
        return self._dsn

    # -- PostgreSQL -------------------------------------------------------------------

    @property
    def pool(self) -> ConnectionPool:
        if not self.is_postgres:
            raise DatabaseConfigError(f"database {self.name!r} is {self.db_type}, not PostgreSQL")
        pool: ConnectionPool | None = _Registry.lookup(_Registry.pools, self._key)
        if pool is not None:
            return pool
        with _Registry.building_lock(self._key):
            pool = _Registry.lookup(_Registry.pools, self._key)
            if pool is None:
                # One direct attempt first: an unreachable database fails now, with the
                # driver's reason, instead of after the pool's timeout of silent retries.
                self._probe()
                pool = ConnectionPool(
                    self._dsn,
                    min_size=1,
                    max_size=max(1, self.pool_max_size),
                    kwargs={"autocommit": True, **self._pooler_kwargs()},
                    configure=self._configure,
                    name=self.name,
                    open=False,
                    timeout=30.0,
                )
                pool.open(wait=False)  # connects in the pool's own threads
                _Registry.store(_Registry.pools, self._key, pool)
        return pool

    @property
    def _key(self) -> str:
        return f"{self.name}\0{self._dsn}"

    @contextmanager
    def connection(self, timeout: float = 10.0) -> Iterator[psycopg.Connection]:
        """A pooled autocommit connection; a DatabaseUnavailableError if none can be had or
        it breaks while in use. Errors of a statement on a live connection (a deadlock, a
        cancel, a lock timeout) pass through as themselves, for callers to retry."""
        held: psycopg.Connection | None = None
        try:
            with self.pool.connection(timeout=timeout) as conn:
                held = conn
                yield conn
        except PoolTimeout as exc:
            raise self.unavailable(self._probe_error() or exc) from None
        except psycopg.OperationalError as exc:
            if held is not None and not held.broken:
                raise
            raise self.unavailable(exc) from None

    def connect(self, **kwargs: Any) -> psycopg.Connection:
        """A dedicated connection outside the pool (long-lived worker loops)."""
        options = {"autocommit": True, "connect_timeout": 10, **self._pooler_kwargs(), **kwargs}
        try:
            conn = psycopg.connect(self._dsn, **options)
        except psycopg.OperationalError as exc:
            raise self.unavailable(exc) from None
        self._configure(conn)
        return conn

    # -- transaction poolers ----------------------------------------------------------

    @property
    def pooled(self) -> bool:
        """Whether this database is reached through a transaction pooler: set by
        FLOWFLEET_PGBOUNCER, else detected once per connection string."""
        forced = pooler_setting()
        if forced is not None:
            return forced
        known = _detected.get(self._dsn)
        if known is None:
            self._probe()
            known = _detected.get(self._dsn, False)
        return known

    def _pooler_kwargs(self) -> dict[str, Any]:
        # A transaction pooler hands each transaction to any server connection, where a
        # statement psycopg prepared on another one does not exist (or exists twice):
        # statements go unprepared, which costs the claim little (docs/capacity.md).
        return {"prepare_threshold": None} if self.pooled else {}

    def _configure(self, conn: psycopg.Connection) -> None:
        # Through a pooler, a session setting would land on whichever server connection
        # served this one statement, and on other clients' work after it: the queue's SQL
        # assumes no session state, and the session bounds are set for the role instead.
        if not self.pooled:
            session_setup(conn)

    @property
    def listen_dsn(self) -> str | None:
        """Where to LISTEN: FLOWFLEET_LISTEN_DSN when set; else this database, unless it is
        reached through a transaction pooler (None: poll)."""
        configured = os.environ.get(LISTEN_DSN_ENV, "").strip()
        if configured:
            check_dsn(f"{self.name} ({LISTEN_DSN_ENV})", configured)
            return configured
        return None if self.pooled else self._dsn

    def connect_for_listen(self) -> psycopg.Connection:
        """A dedicated connection that can LISTEN (see ``listen_dsn``)."""
        dsn = self.listen_dsn
        if dsn is None:
            raise DatabaseConfigError(
                f"database {self.name!r} is reached through a transaction pooler and "
                f"{LISTEN_DSN_ENV} is not set: there is no connection to LISTEN on"
            )
        try:
            return psycopg.connect(dsn, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise self.unavailable(exc) from None

    def unavailable(self, cause: object) -> DatabaseUnavailableError:
        if isinstance(cause, DatabaseUnavailableError):
            return cause  # already says which database; saying it twice repeats the prefix
        reason = redact(str(cause).strip().splitlines()[0] if str(cause).strip() else "")
        return DatabaseUnavailableError(
            f"cannot reach database {self.name!r} at {self.location}: {reason or 'no answer'}"
        )

    def _probe(self) -> None:
        try:
            with psycopg.connect(self._dsn, connect_timeout=10, autocommit=True) as conn:
                _detected[self._dsn] = behind_pooler(conn)
        except psycopg.OperationalError as exc:
            raise self.unavailable(exc) from None

    def _probe_error(self) -> str | None:
        """Why the pool has no connection: one direct attempt says what the pool swallowed."""
        try:
            self._probe()
        except DatabaseUnavailableError as exc:
            return str(exc).split(": ", 1)[-1]
        return None

    # -- Any database -----------------------------------------------------------------

    def execute_query(
        self, db_name: str | None, query: str, params: Sequence[Any] | dict[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        """Run one statement on ``db_name`` (the seed passes its own name) and return its
        rows as tuples; statements without a result return ``[]``."""
        target = self if db_name in (None, self.name) else DatabaseManager(db_name)
        return target._execute(query, params)

    def _execute(
        self, query: str, params: Sequence[Any] | dict[str, Any] | None
    ) -> list[tuple[Any, ...]]:
        if self.is_postgres:
            with self.connection() as conn, conn.cursor() as cur:
                cur.execute(query.encode() if params is None else query, params)
                return [tuple(r) for r in cur.fetchall()] if cur.description else []
        return self._execute_sqlalchemy(query, params)

    def _engine(self) -> Any:
        import sqlalchemy

        engine = _Registry.lookup(_Registry.engines, self._key)
        if engine is not None:
            return engine
        with _Registry.building_lock(self._key):
            engine = _Registry.lookup(_Registry.engines, self._key)
            if engine is None:
                try:
                    engine = sqlalchemy.create_engine(self._dsn, pool_pre_ping=True)
                except ImportError as exc:  # the dialect's driver: pyodbc, MySQLdb, ...
                    raise DatabaseConfigError(
                        missing_driver(self.name, self.db_type, exc)
                    ) from None
                _Registry.store(_Registry.engines, self._key, engine)
        return engine

    def _execute_sqlalchemy(
        self, query: str, params: Sequence[Any] | dict[str, Any] | None
    ) -> list[tuple[Any, ...]]:
        import sqlalchemy

        try:
            with self._engine().begin() as conn:
                result = conn.exec_driver_sql(query, params if params is not None else ())
                return [tuple(r) for r in result.fetchall()] if result.returns_rows else []
        except sqlalchemy.exc.OperationalError as exc:
            raise self.unavailable(exc.orig or exc) from None

    def health_check(self) -> dict[str, Any]:
        """``{"status": "healthy"|"unhealthy", "latency_ms": …, "type": …}``."""
        started = time.perf_counter()
        try:
            if self.is_postgres:
                with self.connection(timeout=5.0) as conn:
                    conn.execute(query("ping"))
            else:
                self._execute_sqlalchemy(query("ping"), None)
        except (DatabaseUnavailableError, DatabaseConfigError) as exc:
            return {"status": "unhealthy", "type": self.db_type, "error": str(exc)}
        latency = (time.perf_counter() - started) * 1000
        return {"status": "healthy", "type": self.db_type, "latency_ms": round(latency, 2)}

    def pool_stats(self) -> dict[str, Any]:
        """Pool size and use, for ``connection_pool_monitoring``."""
        if not self.is_postgres:
            pool = self._engine().pool
            size = pool.size() if hasattr(pool, "size") else 0
            used = pool.checkedout() if hasattr(pool, "checkedout") else 0
            return {"pool_size": size, "checked_out": used, "max_size": size}
        stats = self.pool.get_stats()
        size = stats.get("pool_size", 0)
        idle = stats.get("pool_available", 0)
        return {
            "pool_size": size,
            "checked_out": max(0, size - idle),
            "available": idle,
            "max_size": self.pool.max_size,
            "requests_waiting": stats.get("requests_waiting", 0),
        }

    def close(self) -> None:
        pool = _Registry.pop(_Registry.pools, self._key)
        engine = _Registry.pop(_Registry.engines, self._key)
        if pool is not None:
            pool.close()
        if engine is not None:
            engine.dispose()

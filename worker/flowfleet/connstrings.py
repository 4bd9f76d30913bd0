"""Connection strings of named databases: where each comes from, whether it can work, and
what type of database it names.

A name such as ``rpa_db`` resolves, in the environment named by ``PREFECT_ENVIRONMENT``
(default ``development``), to ``{ENV}_GLOBAL_RPA_DB_CONNECTION_STRING`` and then to
``RPA_DB_CONNECTION_STRING``; ``{ENV}_GLOBAL_RPA_DB_TYPE`` gives its type.
"""

from __future__ import annotations

import os

import psycopg
from psycopg import conninfo

from flowfleet.config import env_name, environment
from flowfleet.errors import DatabaseConfigError

POSTGRES_TYPES = {"postgresql", "postgres"}


def check_dsn(name: str, dsn: str) -> None:
    """Refuse a PostgreSQL connection string that can never work, as a bad setting rather
    than an outage. The driver's own message may quote fragments of the string (its
    password among them), so the reason given is ours."""
    try:
        info = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        raise DatabaseConfigError(
            f"the connection string of database {name!r} is malformed (expected "
            "postgresql://user:password@host:port/dbname or key=value pairs)"
        ) from None
    if any("@" in str(info.get(k) or "") for k in ("host", "port", "dbname", "user")):
        raise DatabaseConfigError(
            f"the connection string of database {name!r} does not parse as intended: an "
            "'@' lands in its host or database name (percent-encode '/', '@' and ':' in "
            "the password)"
        )
    port = str(info.get("port") or "")
    if port and not all(p.strip().isdigit() for p in port.split(",")):
        # Not quoted: with an unescaped "/" in the password, this "port" is part of it.
        raise DatabaseConfigError(
            f"the connection string of database {name!r} has a port that is not a number "
            "(if its password holds '/', '@' or ':', percent-encode them)"
        )


def resolve(name: str) -> tuple[str, str]:
    """(connection string, type) for a database name, or a DatabaseConfigError naming both
    environment variables that were tried."""
    env = environment()
    tried = [
        env_name(env, "global", name, "connection_string"),
        env_name(name, "connection_string"),
    ]
    dsn = next((os.environ[v] for v in tried if os.environ.get(v)), None)
    if dsn is None:
        raise DatabaseConfigError(
            f"database {name!r} is not configured: set {tried[0]} or {tried[1]}"
        )
    db_type = os.environ.get(env_name(env, "global", name, "type")) or type_of(dsn)
    return dsn, db_type.lower()


def type_of(dsn: str) -> str:
    scheme = dsn.split("://", 1)[0].split("+", 1)[0] if "://" in dsn else "postgresql"
    return "postgresql" if scheme in POSTGRES_TYPES else scheme


# The extra of pyproject.toml that installs each SQLAlchemy dialect's default driver.
DRIVER_EXTRAS = {"pyodbc": "mssql", "pymysql": "mysql", "oracledb": "oracle"}


def missing_driver(name: str, db_type: str, exc: ImportError) -> str:
    module = exc.name or str(exc)
    extra = DRIVER_EXTRAS.get(module)
    how = f"pip install 'flowfleet[{extra}]'" if extra else f"install the {module!r} package"
    return f"database {name!r} ({db_type}) needs the driver {module!r}, not installed: {how}"

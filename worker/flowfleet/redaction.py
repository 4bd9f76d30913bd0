"""Keeping passwords out of every message: redaction and safe DSN descriptions.

Its own room because the worker, the CLI, the logs and the operator all need it, and none
of them should import the database layer just to hide a password.
"""

from __future__ import annotations

import re

import psycopg
from psycopg import conninfo

_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)\S*@")
# key=value DSNs may quote a password holding spaces: password='a b\'c'
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def redact(text: str) -> str:
    """Strip passwords from anything that may hold a connection string."""
    return _KV_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", text))


def describe_dsn(dsn: str) -> str:
    """``host:port/dbname`` of a DSN, for messages; never the password."""
    try:
        info = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "an unparsable connection string"
    host = info.get("host") or info.get("hostaddr") or "localhost"
    place = f"{host}:{info.get('port') or 5432}/{info.get('dbname') or info.get('user') or ''}"
    if "@" in place or "/" in place.split("/", 1)[1]:
        # A password holding an unescaped "/" makes libpq read the rest of the URL (the
        # password among it) as host, port and database: show none of it.
        return "a connection string that does not parse as intended (percent-encode the password)"
    return place

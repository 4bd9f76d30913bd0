"""Connection-string passwords never reach a message: redact(), describe_dsn(), repr."""

from __future__ import annotations

import pytest

from flowfleet.database import DatabaseManager, describe_dsn, redact
from flowfleet.errors import DatabaseConfigError, DatabaseUnavailableError

SECRET = "s3cretpw"  # noqa: S105 - a fake password the output must not show


@pytest.mark.parametrize(
    "text",
    [
        f"postgresql://user:{SECRET}@db.example:5432/rpa_db",
        f"postgres://user:{SECRET}@db/rpa_db?sslmode=require",
        f"postgresql+psycopg://user:{SECRET}@db/rpa_db",
        f"mssql+pyodbc://sa:{SECRET}@sqlhost/SurveyHub?driver=ODBC+Driver+18",
        f"postgresql://user:pa:ss/{SECRET}@db/rpa_db",
        f"could not connect with postgresql://user:{SECRET}@db/x: refused",
        f"postgresql://:{SECRET}@db/rpa_db",  # no user: libpq takes PGUSER
        f"postgresql://user:{SECRET}@{SECRET}@db/rpa_db",  # an unencoded '@' in it
        f"host=db port=5432 user=u password={SECRET} dbname=rpa_db",
        f"host=db PASSWORD = {SECRET} dbname=rpa_db",
        f"postgresql://db/rpa_db?password={SECRET}",
    ],
)
def test_redact_removes_the_password(text: str) -> None:
    cleaned = redact(text)
    assert SECRET not in cleaned
    assert "***" in cleaned


def test_redact_keeps_what_locates_the_database() -> None:
    assert redact(f"postgresql://user:{SECRET}@db:5432/rpa_db") == (
        "postgresql://user:***@db:5432/rpa_db"
    )
    assert redact(f"host=db password={SECRET} dbname=rpa_db") == (
        "host=db password=*** dbname=rpa_db"
    )


def test_redact_leaves_text_without_passwords_alone() -> None:
    for text in ("postgresql://user@db/rpa_db", "host=db dbname=x", "sqlite:///tmp/a.db", ""):
        assert redact(text) == text


def test_redact_quoted_key_value_password_with_spaces() -> None:
    # libpq allows single-quoted values holding spaces; no part of one may survive.
    cleaned = redact("host=db password='s3cret pw tail' dbname=rpa_db")
    assert "s3cret" not in cleaned
    assert "tail" not in cleaned
    assert "dbname=rpa_db" in cleaned


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        (f"postgresql://user:{SECRET}@db.example:5433/rpa_db", "db.example:5433/rpa_db"),
        (f"postgresql://user:{SECRET}@db.example/rpa_db", "db.example:5432/rpa_db"),
        (f"host=10.0.0.5 port=6432 password={SECRET} dbname=q", "10.0.0.5:6432/q"),
        (f"hostaddr=10.0.0.6 user=bob password={SECRET}", "10.0.0.6:5432/bob"),
    ],
)
def test_describe_dsn_names_host_port_and_database_only(dsn: str, expected: str) -> None:
    assert describe_dsn(dsn) == expected


def test_describe_unparsable_dsn() -> None:
    assert describe_dsn(f"password={SECRET} ===") == "an unparsable connection string"


def test_manager_repr_location_and_errors_hide_the_password() -> None:
    pg = DatabaseManager("q", connection_string=f"postgresql://u:{SECRET}@db:5432/rpa")
    assert SECRET not in repr(pg)
    assert pg.location == "db:5432/rpa"
    assert pg.dsn.endswith("@db:5432/rpa")  # the driver still gets the real string

    err = pg.unavailable(f"FATAL: password authentication failed for postgresql://u:{SECRET}@db")
    assert isinstance(err, DatabaseUnavailableError)
    assert SECRET not in str(err)
    assert "'q'" in str(err) and "db:5432/rpa" in str(err)

    other = DatabaseManager("src", connection_string=f"mssql+pyodbc://sa:{SECRET}@sql/Survey")
    assert other.db_type == "mssql"
    assert SECRET not in repr(other) and SECRET not in other.location


def test_unavailable_keeps_one_line() -> None:
    pg = DatabaseManager("q", connection_string="postgresql://u@db/rpa")
    err = pg.unavailable("connection refused\n\tIs the server running?")
    assert "\n" not in str(err)
    assert "connection refused" in str(err)
    assert "no answer" in str(pg.unavailable(""))


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://app:4242/Xy9+s3cret@127.0.0.1:1/db",  # base64 password with a "/"
        "postgresql://app:ab/Xy9+s3cret@127.0.0.1:1/db",
        "postgresql://app:Xy9/s3cret@db.example:5432/rpa",
    ],
)
def test_password_with_unescaped_slash_never_reaches_a_message(dsn: str) -> None:
    assert "s3cret" not in describe_dsn(dsn)
    with pytest.raises(DatabaseConfigError) as caught:
        DatabaseManager("queue", connection_string=dsn)
    assert "s3cret" not in str(caught.value)
    assert "percent-encode" in str(caught.value)

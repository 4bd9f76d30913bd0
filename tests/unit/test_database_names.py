"""Named databases: which environment variable a name resolves to, and its type."""

from __future__ import annotations

import pytest

from flowfleet.database import DatabaseManager, resolve
from flowfleet.errors import DatabaseConfigError

VARS = (
    "PREFECT_ENVIRONMENT",
    "DEVELOPMENT_GLOBAL_RPA_DB_CONNECTION_STRING",
    "PRODUCTION_GLOBAL_RPA_DB_CONNECTION_STRING",
    "RPA_DB_CONNECTION_STRING",
    "DEVELOPMENT_GLOBAL_RPA_DB_TYPE",
    "DEVELOPMENT_GLOBAL_RPA_DB_POOL_MAX_SIZE",
    "SURVEYHUB_CONNECTION_STRING",
    "DEVELOPMENT_GLOBAL_SURVEYHUB_CONNECTION_STRING",
    "NOSUCH_DB_CONNECTION_STRING",
    "DEVELOPMENT_GLOBAL_NOSUCH_DB_CONNECTION_STRING",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in VARS:
        monkeypatch.delenv(var, raising=False)


def test_environment_specific_variable_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RPA_DB_CONNECTION_STRING", "postgresql://plain/db")
    assert resolve("rpa_db") == ("postgresql://plain/db", "postgresql")
    monkeypatch.setenv("DEVELOPMENT_GLOBAL_RPA_DB_CONNECTION_STRING", "postgresql://dev/db")
    assert resolve("rpa_db")[0] == "postgresql://dev/db"


def test_production_resolves_production_variable_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_ENVIRONMENT", "production")
    monkeypatch.setenv("RPA_DB_CONNECTION_STRING", "postgresql://plain/db")
    monkeypatch.setenv("DEVELOPMENT_GLOBAL_RPA_DB_CONNECTION_STRING", "postgresql://dev/db")
    assert resolve("rpa_db")[0] == "postgresql://plain/db"  # development's is not consulted
    monkeypatch.setenv("PRODUCTION_GLOBAL_RPA_DB_CONNECTION_STRING", "postgresql://prod/db")
    assert resolve("rpa_db")[0] == "postgresql://prod/db"
    assert DatabaseManager("rpa_db").dsn == "postgresql://prod/db"


def test_empty_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVELOPMENT_GLOBAL_RPA_DB_CONNECTION_STRING", "")
    monkeypatch.setenv("RPA_DB_CONNECTION_STRING", "postgresql://plain/db")
    assert resolve("rpa_db")[0] == "postgresql://plain/db"


@pytest.mark.parametrize("name", ["nosuch_db", "NoSuch-DB"])
def test_unknown_name_names_both_variables_tried(name: str) -> None:
    with pytest.raises(DatabaseConfigError) as info:
        DatabaseManager(name)
    message = str(info.value)
    assert "DEVELOPMENT_GLOBAL_NOSUCH_DB_CONNECTION_STRING" in message
    assert "NOSUCH_DB_CONNECTION_STRING" in message.replace(
        "DEVELOPMENT_GLOBAL_NOSUCH_DB_CONNECTION_STRING", ""
    )
    assert repr(name) in message


def test_unknown_name_in_production_names_production_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PREFECT_ENVIRONMENT", "production")
    with pytest.raises(DatabaseConfigError, match="PRODUCTION_GLOBAL_NOSUCH_DB_CONNECTION_STRING"):
        resolve("nosuch_db")


@pytest.mark.parametrize("name", ["", "   "])
def test_blank_name_is_refused(name: str) -> None:
    with pytest.raises(DatabaseConfigError):
        DatabaseManager(name, connection_string="postgresql://x/y")


@pytest.mark.parametrize(
    ("dsn", "db_type", "postgres"),
    [
        ("postgresql://u@h/db", "postgresql", True),
        ("postgres://u@h/db", "postgresql", True),
        ("postgresql+psycopg://u@h/db", "postgresql", True),
        ("host=h dbname=db", "postgresql", True),
        ("sqlite:///tmp/source.db", "sqlite", False),
        ("mssql+pyodbc://sa:pw@h/SurveyHub", "mssql", False),
        ("mysql+pymysql://u@h/db", "mysql", False),
    ],
)
def test_type_follows_the_url_scheme(dsn: str, db_type: str, postgres: bool) -> None:
    manager = DatabaseManager("src", connection_string=dsn)
    assert manager.db_type == db_type
    assert manager.is_postgres is postgres


def test_type_variable_overrides_the_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RPA_DB_CONNECTION_STRING", "host=h dbname=db")
    monkeypatch.setenv("DEVELOPMENT_GLOBAL_RPA_DB_TYPE", "PostgreSQL")
    assert resolve("rpa_db") == ("host=h dbname=db", "postgresql")


def test_seed_database_configuration_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVELOPMENT_GLOBAL_RPA_DB_TYPE", "postgresql")
    monkeypatch.setenv(
        "DEVELOPMENT_GLOBAL_RPA_DB_CONNECTION_STRING",
        "postgresql://user:pass@localhost:5432/rpa_db",
    )
    manager = DatabaseManager("rpa_db")
    assert manager.is_postgres
    assert manager.location == "localhost:5432/rpa_db"


def test_pool_size_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RPA_DB_CONNECTION_STRING", "postgresql://u@h/db")
    assert DatabaseManager("rpa_db").pool_max_size == 10
    monkeypatch.setenv("DEVELOPMENT_GLOBAL_RPA_DB_POOL_MAX_SIZE", "3")
    assert DatabaseManager("rpa_db").pool_max_size == 3
    assert DatabaseManager("rpa_db", pool_max_size=7).pool_max_size == 7


def test_mixed_case_name_resolves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SURVEYHUB_CONNECTION_STRING", "sqlite:///tmp/survey.db")
    manager = DatabaseManager("SurveyHub")
    assert manager.name == "SurveyHub"
    assert manager.db_type == "sqlite"


def test_non_postgres_database_has_no_pool() -> None:
    manager = DatabaseManager("src", connection_string="sqlite:///tmp/x.db")
    with pytest.raises(DatabaseConfigError, match="not PostgreSQL"):
        _ = manager.pool

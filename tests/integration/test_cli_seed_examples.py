"""The seed document's own snippets, as the README claims them: the troubleshooting
snippet's claims do not stay locked for hours, and Pattern 2's SQL Server source without
its driver is reported, not raised."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
from test_cli import run_cli

from flowfleet.database import DatabaseManager
from flowfleet.distributed import DistributedProcessor

# The seed's "Test record claiming" troubleshooting snippet, in a process of its own.
SNIPPET = textwrap.dedent(
    """
    import os, signal
    from flowfleet.database import DatabaseManager
    from flowfleet.distributed import DistributedProcessor

    processor = DistributedProcessor(DatabaseManager("rpa_db"))
    records = processor.claim_records_batch("your_flow", 5)
    print(f"Claimed {len(records)} records")
    if os.environ.get("DIE"):
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


def run_snippet(dsn: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "RPA_DB_CONNECTION_STRING": dsn, "POD_NAME": "snippet", **env}
    environ.pop("PREFECT_ENVIRONMENT", None)
    return subprocess.run(
        [sys.executable, "-c", SNIPPET], capture_output=True, text=True, timeout=60, env=environ
    )


def test_snippet_claims_come_back_when_it_exits(dsn: str, db: DatabaseManager) -> None:
    processor = DistributedProcessor(db)
    processor.add_records_to_queue("your_flow", [{"n": i} for i in range(8)])
    result = run_snippet(dsn)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Claimed 5 records"
    status = processor.get_queue_status("your_flow")
    assert (status["pending_records"], status["processing_records"]) == (8, 0)


def test_cleanup_releases_a_killed_snippets_claims(dsn: str, db: DatabaseManager) -> None:
    processor = DistributedProcessor(db)
    processor.add_records_to_queue("your_flow", [{"n": i} for i in range(8)])
    assert run_snippet(dsn, DIE="1").returncode == -9
    assert processor.get_queue_status("your_flow")["processing_records"] == 5

    # Its lease (cleanup_timeout_hours) has not run out, so a plain cleanup leaves it...
    plain = run_cli("cleanup", "--dsn", dsn)
    assert plain.stdout.splitlines() == ["released 0 orphaned records"]
    # ... status names the holder, and cleanup --instance gives its records back.
    shown = run_cli("status", "--json", "--instances", "--dsn", dsn)
    assert [r["instance_id"] for r in json.loads(shown.stdout)["by_instance"]] == ["snippet"]
    freed = run_cli("cleanup", "--instance", "snippet", "--dsn", dsn)
    assert freed.returncode == 0, freed.stderr
    assert freed.stdout.splitlines() == [
        "released 0 orphaned records",
        "released 5 records held by snippet",
    ]
    status = processor.get_queue_status("your_flow")
    assert (status["pending_records"], status["processing_records"]) == (8, 0)
    assert processor.claim_records_batch("your_flow", 8)  # and they can be claimed again


@pytest.mark.skipif(
    importlib.util.find_spec("pyodbc") is not None, reason="pyodbc is installed here"
)
def test_sql_server_source_without_pyodbc_is_reported_unhealthy(
    db: DatabaseManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "SURVEYHUB_CONNECTION_STRING",
        "mssql+pyodbc://sa:hunter2@sqlhost/SurveyHub?driver=ODBC+Driver+18+for+SQL+Server",
    )
    processor = DistributedProcessor(db, DatabaseManager("SurveyHub"))
    report = processor.health_check()
    source = report["databases"]["SurveyHub"]
    assert source["status"] == "unhealthy"
    assert source["error"] == (
        "database 'SurveyHub' (mssql) needs the driver 'pyodbc', not installed: "
        "pip install 'flowfleet[mssql]'"
    )
    assert report["databases"]["rpa_db"]["status"] == "healthy"
    assert report["status"] == "degraded"  # the queue itself still works
    assert "hunter2" not in str(report)

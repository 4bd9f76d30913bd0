"""The seed document's examples, verbatim but for ``core.`` -> ``flowfleet.``.

Each snippet below is copied character for character from the seed (the user contract);
``test_snippets_are_verbatim`` checks that against the seed when it is at hand.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import psycopg
import pytest

from flowfleet.database import DatabaseManager
from flowfleet.distributed import DistributedProcessor

# The seed document, our contract with existing users, kept in the repository so this
# check runs wherever the tests do (copied from shared/seed/000_e555297f034ce694.txt).
SEED = Path(__file__).resolve().parents[1] / "seed" / "seed_document.txt"
VENV_BIN = Path(sys.executable).parent

VERIFY_SETUP = """\
# Check database migrations
python -c "
from core.database import DatabaseManager
db = DatabaseManager('rpa_db')
print('Database connection: OK')
"

# Check distributed processor
python -c "
from core.distributed import DistributedProcessor
from core.database import DatabaseManager
processor = DistributedProcessor(DatabaseManager('rpa_db'))
health = processor.health_check()
print(f'System health: {health[\\"status\\"]}')
"
"""

BASIC_USAGE = """\
from core.distributed import DistributedProcessor
from core.database import DatabaseManager
from core.flow_template import distributed_processing_flow

# Initialize processor
processor = DistributedProcessor(DatabaseManager('rpa_db'))

# Add records to queue
records = [
    {"survey_id": "SURV-001", "customer_id": "CUST-001"},
    {"survey_id": "SURV-002", "customer_id": "CUST-002"}
]
processor.add_records_to_queue("survey_processor", records)

# Process records
result = distributed_processing_flow("survey_processor", batch_size=50)
print(f"Processed {result['completed']} records")
"""

CONFIGURATION = """\
# Enable distributed processing
DEVELOPMENT_SURVEY_PROCESSOR_USE_DISTRIBUTED_PROCESSING=true
DEVELOPMENT_SURVEY_PROCESSOR_DISTRIBUTED_BATCH_SIZE=50
"""

PATTERN_1 = """\
from core.distributed import DistributedProcessor
from core.database import DatabaseManager

# Initialize
processor = DistributedProcessor(DatabaseManager('rpa_db'))

# Add work to queue
records = [{"file_path": f"/data/file_{i}.csv"} for i in range(100)]
processor.add_records_to_queue("file_processor", records)

# Process with distributed flow
from core.flow_template import distributed_processing_flow
result = distributed_processing_flow("file_processor", batch_size=25)
"""

PATTERN_2 = """\
# Read from one database, write to another
from core.database import DatabaseManager

rpa_db = DatabaseManager('rpa_db')      # PostgreSQL for queue
source_db = DatabaseManager('SurveyHub') # SQL Server for source data

processor = DistributedProcessor(rpa_db, source_db)

# Your processing logic can read from source_db and write results to rpa_db
"""

PATTERN_3 = """\
@flow(name="my-existing-flow")
def my_flow(use_distributed=None, batch_size=None):
    \"\"\"Existing flow with distributed processing support.\"\"\"

    config = ConfigManager("my_flow")
    use_distributed = use_distributed if use_distributed is not None else config.get_variable("use_distributed_processing", False)

    if use_distributed:
        # Use distributed processing
        batch_size = batch_size or config.get_variable("distributed_batch_size", 50)
        return distributed_processing_flow("my_flow", batch_size)
    else:
        # Use original logic
        return my_original_flow_logic()
"""  # noqa: E501

ENVIRONMENT_VARIABLES = """\
# Database configuration
DEVELOPMENT_GLOBAL_RPA_DB_TYPE=postgresql
DEVELOPMENT_GLOBAL_RPA_DB_CONNECTION_STRING=postgresql://user:pass@localhost:5432/rpa_db

# Distributed processing configuration
DEVELOPMENT_MY_FLOW_USE_DISTRIBUTED_PROCESSING=true
DEVELOPMENT_MY_FLOW_DISTRIBUTED_BATCH_SIZE=50
DEVELOPMENT_DISTRIBUTED_PROCESSOR_CLEANUP_TIMEOUT_HOURS=2
DEVELOPMENT_DISTRIBUTED_PROCESSOR_MAX_RETRIES=3
"""

HEALTH_CHECKS = """\
# System health check
processor = DistributedProcessor(DatabaseManager('rpa_db'))
health = processor.health_check()

print(f"Status: {health['status']}")
print(f"Databases: {health['databases']}")
print(f"Queue: {health['queue_status']}")
"""

QUEUE_MONITORING = """\
# Queue status
status = processor.get_queue_status("my_flow")
print(f"Pending: {status['pending_records']}")
print(f"Processing: {status['processing_records']}")
print(f"Failed: {status['failed_records']}")
"""

PERFORMANCE_MONITORING = """\
from core.monitoring import processing_performance_monitoring

# Performance metrics
perf = processing_performance_monitoring(time_window_hours=24)
print(f"Success rate: {perf['overall_metrics']['success_rate_percent']}%")
print(f"Processing rate: {perf['overall_metrics']['avg_processing_rate_per_hour']} records/hour")
"""

NO_RECORDS_BEING_PROCESSED = """\
# Check queue status
status = processor.get_queue_status("your_flow")
print(f"Queue status: {status}")

# Check configuration
from core.config import ConfigManager
config = ConfigManager("your_flow")
print(f"Distributed enabled: {config.get_variable('use_distributed_processing', False)}")

# Test record claiming
records = processor.claim_records_batch("your_flow", 5)
print(f"Claimed {len(records)} records")
"""

HIGH_ERROR_RATES = '''\
# Analyze errors
from core.database import DatabaseManager
db = DatabaseManager('rpa_db')

errors = db.execute_query("rpa_db", """
    SELECT error_message, COUNT(*) as count
    FROM processing_queue
    WHERE status = 'failed'
    AND updated_at > NOW() - INTERVAL '24 hours'
    GROUP BY error_message
    ORDER BY count DESC
    LIMIT 5
""")

for error, count in errors:
    print(f"{count}: {error}")
'''

ORPHANED_RECORDS = """\
# Clean up orphaned records
cleaned = processor.cleanup_orphaned_records(timeout_hours=2)
print(f"Cleaned up {cleaned} orphaned records")
"""

PERFORMANCE_ISSUES = """\
# Check performance metrics
from core.monitoring import processing_performance_monitoring

perf = processing_performance_monitoring(time_window_hours=6)
print(f"Success rate: {perf['overall_metrics']['success_rate_percent']}%")
print(f"Processing rate: {perf['overall_metrics']['avg_processing_rate_per_hour']} records/hour")

# Check connection pool
from core.tasks import connection_pool_monitoring
pool_status = connection_pool_monitoring("rpa_db")
print(f"Pool utilization: {pool_status['utilization_percent']}%")
"""

SNIPPETS = {
    "verify_setup": VERIFY_SETUP,
    "basic_usage": BASIC_USAGE,
    "configuration": CONFIGURATION,
    "pattern_1": PATTERN_1,
    "pattern_2": PATTERN_2,
    "pattern_3": PATTERN_3,
    "environment_variables": ENVIRONMENT_VARIABLES,
    "health_checks": HEALTH_CHECKS,
    "queue_monitoring": QUEUE_MONITORING,
    "performance_monitoring": PERFORMANCE_MONITORING,
    "no_records_being_processed": NO_RECORDS_BEING_PROCESSED,
    "high_error_rates": HIGH_ERROR_RATES,
    "orphaned_records": ORPHANED_RECORDS,
    "performance_issues": PERFORMANCE_ISSUES,
}

# The seed's own imports, which its later snippets take as already done.
SEED_IMPORTS = """\
from core.distributed import DistributedProcessor
from core.database import DatabaseManager
"""


def flowfleet_code(snippet: str) -> str:
    return snippet.replace("core.", "flowfleet.")


def run(snippet: str, namespace: dict[str, Any]) -> list[str]:
    """Execute a seed snippet in ``namespace`` (a running session); return its printed lines."""
    out = io.StringIO()
    with redirect_stdout(out):
        exec(compile(flowfleet_code(snippet), "<seed>", "exec"), namespace)  # noqa: S102
    return out.getvalue().splitlines()


def env_block(block: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in block.splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, value in pairs}


@pytest.fixture
def session(db: DatabaseManager) -> Iterator[dict[str, Any]]:
    namespace: dict[str, Any] = {}
    run(SEED_IMPORTS, namespace)
    run("processor = DistributedProcessor(DatabaseManager('rpa_db'))", namespace)
    yield namespace


def test_snippets_are_verbatim() -> None:
    text = SEED.read_text(encoding="utf-8")
    for name, snippet in SNIPPETS.items():
        assert snippet in text, f"{name} differs from the seed"


def test_verify_setup(dsn: str, db: DatabaseManager) -> None:
    env = dict(os.environ, RPA_DB_CONNECTION_STRING=dsn, PATH=f"{VENV_BIN}:{os.environ['PATH']}")
    env.pop("PREFECT_ENVIRONMENT", None)
    result = subprocess.run(
        ["bash", "-e", "-c", flowfleet_code(VERIFY_SETUP)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["Database connection: OK", "System health: healthy"]


def test_verify_setup_reports_an_unmigrated_database(empty_dsn: str) -> None:
    env = dict(os.environ, RPA_DB_CONNECTION_STRING=empty_dsn)
    env.pop("PREFECT_ENVIRONMENT", None)
    env["PATH"] = f"{VENV_BIN}:{os.environ['PATH']}"
    result = subprocess.run(
        ["bash", "-c", flowfleet_code(VERIFY_SETUP)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "System health: unhealthy" in result.stdout


def test_configuration_blocks(db: DatabaseManager, monkeypatch: pytest.MonkeyPatch) -> None:
    from flowfleet.config import ConfigManager

    for key, value in env_block(CONFIGURATION).items():
        monkeypatch.setenv(key, value)
    config = ConfigManager("survey_processor")
    assert config.get_variable("use_distributed_processing", False) is True
    assert config.get_variable("distributed_batch_size", 10) == 50

    variables = env_block(ENVIRONMENT_VARIABLES)
    assert variables["DEVELOPMENT_GLOBAL_RPA_DB_CONNECTION_STRING"].startswith("postgresql://")
    variables["DEVELOPMENT_GLOBAL_RPA_DB_CONNECTION_STRING"] = db.dsn  # our server, not theirs
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    config = ConfigManager("my_flow")
    assert config.get_variable("use_distributed_processing", False) is True
    assert config.get_variable("distributed_batch_size", 10) == 50
    rpa_db = DatabaseManager("rpa_db")
    assert rpa_db.dsn == db.dsn and rpa_db.db_type == "postgresql"
    processor = DistributedProcessor(rpa_db)
    assert processor.cleanup_timeout_hours == 2.0
    assert processor.policy.max_retries == 3
    assert processor.health_check()["status"] == "healthy"


def test_health_checks(session: dict[str, Any]) -> None:
    session["processor"].add_records_to_queue("my_flow", [{"n": 1}])
    lines = run(HEALTH_CHECKS, session)
    health = session["health"]
    assert health["status"] == "healthy"
    assert set(health["databases"]) == {"rpa_db"}
    assert health["databases"]["rpa_db"]["status"] == "healthy"
    assert health["queue_status"]["pending_records"] == 1
    assert lines[0] == "Status: healthy"
    assert lines[1] == f"Databases: {health['databases']}"
    assert lines[2] == f"Queue: {health['queue_status']}"


def test_queue_monitoring(session: dict[str, Any]) -> None:
    worker = DistributedProcessor(session["processor"].queue_db, instance_id="pod", max_retries=0)
    worker.add_records_to_queue("my_flow", [{"n": i} for i in range(6)])
    claimed = worker.claim_records_batch("my_flow", 3)
    worker.mark_record_failed(claimed[0]["id"], "bad")
    worker.mark_record_completed(claimed[1]["id"])
    assert run(QUEUE_MONITORING, session) == ["Pending: 3", "Processing: 1", "Failed: 1"]


def seed_some_outcomes(queue_db: DatabaseManager, conn: psycopg.Connection) -> None:
    """Three completed and one failed in the window, one completed long ago, two waiting."""
    worker = DistributedProcessor(queue_db, instance_id="pod", max_retries=0)
    worker.add_records_to_queue("perf_flow", [{"n": i} for i in range(7)])
    claimed = worker.claim_records_batch("perf_flow", 5)
    for record in claimed[:4]:
        assert worker.mark_record_completed(record["id"]) is True
    assert worker.mark_record_failed(claimed[4]["id"], "bad") == "failed"
    conn.execute(
        "UPDATE processing_history SET updated_at = LOCALTIMESTAMP - interval '30 hours',"
        " completed_at = LOCALTIMESTAMP - interval '30 hours' WHERE id = %s",
        (claimed[0]["id"],),
    )


def test_performance_monitoring(session: dict[str, Any], conn: psycopg.Connection) -> None:
    seed_some_outcomes(session["processor"].queue_db, conn)
    lines = run(PERFORMANCE_MONITORING, session)
    perf = session["perf"]
    assert perf["time_window_hours"] == 24
    assert perf["overall_metrics"]["completed_records"] == 3
    assert perf["overall_metrics"]["failed_records"] == 1
    assert perf["overall_metrics"]["in_progress_records"] == 2
    assert perf["overall_metrics"]["success_rate_percent"] == 75.0
    assert perf["overall_metrics"]["avg_processing_rate_per_hour"] == round(3 / 24, 2)
    assert perf["overall_metrics"]["avg_processing_seconds"] >= 0
    assert set(perf["flow_metrics"]) == {"perf_flow"}
    assert perf["flow_metrics"]["perf_flow"]["completed_records"] == 3
    assert lines == ["Success rate: 75.0%", f"Processing rate: {round(3 / 24, 2)} records/hour"]


def test_performance_monitoring_on_an_idle_queue(db: DatabaseManager) -> None:
    from flowfleet.monitoring import processing_performance_monitoring

    perf = processing_performance_monitoring(time_window_hours=24, db=db)
    assert perf["overall_metrics"]["completed_records"] == 0
    assert perf["overall_metrics"]["success_rate_percent"] == 100.0
    assert perf["overall_metrics"]["avg_processing_rate_per_hour"] == 0.0
    assert perf["flow_metrics"] == {}


def test_troubleshooting_no_records_being_processed(
    session: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    processor = session["processor"]
    processor.add_records_to_queue("your_flow", [{"n": i} for i in range(7)])
    before = processor.get_queue_status("your_flow")
    lines = run(NO_RECORDS_BEING_PROCESSED, session)
    assert lines == [
        f"Queue status: {before}",
        "Distributed enabled: False",
        "Claimed 5 records",
    ]
    assert all(r["flow_name"] == "your_flow" for r in session["records"])
    assert processor.get_queue_status("your_flow")["processing_records"] == 5

    monkeypatch.setenv("DEVELOPMENT_YOUR_FLOW_USE_DISTRIBUTED_PROCESSING", "true")
    lines = run(NO_RECORDS_BEING_PROCESSED, session)
    assert lines[1:] == ["Distributed enabled: True", "Claimed 2 records"]


def test_troubleshooting_high_error_rates(session: dict[str, Any]) -> None:
    worker = DistributedProcessor(session["processor"].queue_db, instance_id="pod", max_retries=0)
    worker.add_records_to_queue("etl", [{"n": i} for i in range(5)])
    claimed = worker.claim_records_batch("etl", 5)
    for record in claimed[:3]:
        worker.mark_record_failed(record["id"], "ConnectionError: SurveyHub timed out")
    worker.mark_record_failed(claimed[3]["id"], "KeyError: 'customer_id'")
    lines = run(HIGH_ERROR_RATES, session)
    assert lines == ["3: ConnectionError: SurveyHub timed out", "1: KeyError: 'customer_id'"]


def test_troubleshooting_orphaned_records(
    session: dict[str, Any], conn: psycopg.Connection
) -> None:
    queue_db = session["processor"].queue_db
    crashed = DistributedProcessor(queue_db, instance_id="crashed-pod", lease_seconds=0.05)
    alive = DistributedProcessor(queue_db, instance_id="live-pod")
    crashed.add_records_to_queue("rpa1", [{"n": i} for i in range(4)])
    assert len(crashed.claim_records_batch("rpa1", 2)) == 2
    assert len(alive.claim_records_batch("rpa1", 1)) == 1
    time.sleep(0.15)
    assert run(ORPHANED_RECORDS, session) == ["Cleaned up 2 orphaned records"]
    rows = conn.execute(
        "SELECT status, flow_instance_id, retry_count, count(*) FROM processing_queue"
        " GROUP BY 1, 2, 3 ORDER BY 1"
    ).fetchall()
    assert rows == [("pending", None, 0, 3), ("processing", "live-pod", 0, 1)]
    assert run(ORPHANED_RECORDS, session) == ["Cleaned up 0 orphaned records"]


def test_troubleshooting_performance_issues(
    session: dict[str, Any], conn: psycopg.Connection
) -> None:
    seed_some_outcomes(session["processor"].queue_db, conn)
    lines = run(PERFORMANCE_ISSUES, session)
    assert lines[0] == "Success rate: 75.0%"
    assert lines[1] == "Processing rate: 0.5 records/hour"  # 3 completed in 6 hours
    pool = session["pool_status"]
    assert pool["database"] == "rpa_db"
    assert 0.0 <= pool["utilization_percent"] <= 100.0
    assert pool["max_size"] == 10
    assert lines[2] == f"Pool utilization: {pool['utilization_percent']}%"


def test_connection_pool_monitoring_sees_connections_in_use(db: DatabaseManager) -> None:
    from flowfleet.tasks import connection_pool_monitoring

    with db.connection(), db.connection():
        busy = connection_pool_monitoring("rpa_db")
    assert busy["checked_out"] >= 2
    assert busy["utilization_percent"] >= 20.0
    # The pool may still be opening the connection it decided to grow by, which its
    # stats count as in use for a moment; once settled, nothing is.
    deadline = time.monotonic() + 5
    while (idle := connection_pool_monitoring("rpa_db"))["checked_out"] and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert idle["checked_out"] == 0
    assert idle["utilization_percent"] == 0.0


@pytest.fixture
def survey_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'surveyhub.db'}"
    monkeypatch.setenv("SURVEYHUB_CONNECTION_STRING", url)
    yield url
    DatabaseManager("SurveyHub").close()


def test_pattern_2_multi_database(session: dict[str, Any], survey_hub: str) -> None:
    run(PATTERN_2, session)
    processor = session["processor"]
    source_db = session["source_db"]
    source_db.execute_query("SurveyHub", "CREATE TABLE surveys (id TEXT, score INTEGER)")
    source_db.execute_query("SurveyHub", "INSERT INTO surveys VALUES (?, ?)", ("SURV-001", 9))
    rows = source_db.execute_query("SurveyHub", "SELECT id, score FROM surveys")
    assert rows == [("SURV-001", 9)]
    # ... and write results to rpa_db.
    processor.add_records_to_queue("survey_processor", [{"survey_id": r[0]} for r in rows])
    assert processor.get_queue_status("survey_processor")["pending_records"] == 1

    health = processor.health_check()
    assert health["status"] == "healthy"
    assert set(health["databases"]) == {"rpa_db", "SurveyHub"}
    assert health["databases"]["SurveyHub"] == {
        "status": "healthy",
        "type": "sqlite",
        "latency_ms": health["databases"]["SurveyHub"]["latency_ms"],
    }


FLOW_SESSION = (
    BASIC_USAGE
    + "\n"
    + PATTERN_1
    + """
print("PATTERN_1", json.dumps(result))
rest = distributed_processing_flow("file_processor", batch_size=100)
print("PATTERN_1_REST", json.dumps(rest))

from prefect import flow
from core.config import ConfigManager

def my_original_flow_logic():
    return "original logic"

"""
    + PATTERN_3
    + """
print("PATTERN_3_ORIGINAL", json.dumps(my_flow(use_distributed=False)))
print("PATTERN_3_DISTRIBUTED", json.dumps(my_flow()))
"""
)


def test_basic_usage_pattern_1_and_pattern_3_under_prefect(
    dsn: str, conn: psycopg.Connection, tmp_path: Path
) -> None:
    """The seed's flows, in one Python session as a user would run them. Each flow's
    processor comes from its entrypoint setting (the seed leaves processors implicit)."""
    env = dict(os.environ)
    env.pop("PREFECT_ENVIRONMENT", None)
    env.update(
        RPA_DB_CONNECTION_STRING=dsn,
        DEVELOPMENT_SURVEY_PROCESSOR_ENTRYPOINT="flowfleet.examples:survey_processor",
        DEVELOPMENT_FILE_PROCESSOR_ENTRYPOINT="flowfleet.examples:noop",
        DEVELOPMENT_MY_FLOW_ENTRYPOINT="flowfleet.examples:noop",
        DEVELOPMENT_MY_FLOW_USE_DISTRIBUTED_PROCESSING="true",
        DEVELOPMENT_MY_FLOW_DISTRIBUTED_BATCH_SIZE="7",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    # my_flow's queue gets work before the session starts.
    with psycopg.connect(dsn, autocommit=True) as setup:
        from flowfleet import queue

        queue.enqueue(setup, "my_flow", [{"n": i} for i in range(10)])
    script = "import json\n" + flowfleet_code(FLOW_SESSION)
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout.splitlines()
    tagged = {
        line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1])
        for line in out
        if line.startswith("PATTERN_")
    }

    # Basic Usage: both surveys processed, with the processor's results kept.
    assert "Processed 2 records" in out
    results = conn.execute(
        "SELECT result->>'survey_id' FROM processing_records"
        " WHERE flow_name = 'survey_processor' AND status = 'completed' ORDER BY 1"
    ).fetchall()
    assert results == [("SURV-001",), ("SURV-002",)]

    # Pattern 1: a batch of 25, then the remaining 75.
    assert tagged["PATTERN_1"]["completed"] == 25
    assert tagged["PATTERN_1"]["claimed"] == 25
    assert tagged["PATTERN_1_REST"]["completed"] == 75
    files = conn.execute(
        "SELECT count(*), count(DISTINCT payload->>'file_path') FROM processing_history"
        " WHERE flow_name = 'file_processor'"
    ).fetchone()
    assert files == (100, 100)

    # Pattern 3: original logic when asked; the distributed path from configuration.
    assert tagged["PATTERN_3_ORIGINAL"] == "original logic"
    assert tagged["PATTERN_3_DISTRIBUTED"]["completed"] == 7
    left = conn.execute(
        "SELECT count(*) FROM processing_queue WHERE flow_name = 'my_flow'"
    ).fetchone()
    assert left == (3,)
    assert conn.execute("SELECT count(*) FROM processing_queue").fetchone() == (3,)

"""Start-up: what a worker does with a bad database, entrypoint or setting, and where its
settings come from."""

from __future__ import annotations

import json
import signal
import sys
import time

import psycopg
import pytest
from worker_helpers import (
    Fleet,
    enqueue_keys,
    fleet_fixture,  # noqa: F401 - the fixture `fleet`
    in_flight,
    run_cli,
    wait_until,
)

from flowfleet.throwaway import free_port

FLOW = "env_flow"


def one_line_failure(code: int, stderr: str) -> str:
    """A start-up failure: non-zero exit and exactly one line on stderr, no traceback."""
    assert code != 0
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("flowfleet: "), lines[0]
    return lines[0]


def worker_args(dsn: str, entrypoint: str = "processors.effects:sleepy", *extra: str) -> list[str]:
    return [
        "worker",
        FLOW,
        "--entrypoint",
        entrypoint,
        "--runner",
        "plain",
        "--dsn",
        dsn,
        "--http-port",
        "0",
        "--log-format",
        "json",
        *extra,
    ]


def test_unmigrated_database_says_run_migrate(empty_dsn: str) -> None:
    line = one_line_failure(*run_cli(worker_args(empty_dsn))[::2])
    assert "no flowfleet schema" in line
    assert "run `flowfleet migrate`" in line


@pytest.mark.parametrize(
    ("entrypoint", "says"),
    [
        ("no_such_module_xyz:run", "module 'no_such_module_xyz' not found"),
        ("flowfleet.examples:no_such_function", "has no attribute 'no_such_function'"),
        ("flowfleet.examples:__doc__", "is a str, not a callable"),
        ("nocolon", "must look like module:function"),
        ("flowfleet.examples:", "must look like module:function"),
        ("processors.broken:run", "raised RuntimeError: the processor module is broken"),
    ],
    ids=["missing-module", "missing-attribute", "not-callable", "no-colon", "empty", "raises"],
)
def test_bad_entrypoint_is_one_line_naming_it(dsn: str, entrypoint: str, says: str) -> None:
    line = one_line_failure(*run_cli(worker_args(dsn, entrypoint))[::2])
    assert repr(entrypoint) in line
    assert says in line


@pytest.mark.parametrize(
    ("options", "env", "says"),
    [
        (["--batch-size", "0"], {}, ["batch_size", "--batch-size"]),
        (["--concurrency", "0"], {}, ["concurrency", "--concurrency"]),
        (["--lease-seconds", "0"], {}, ["lease_seconds", "--lease-seconds"]),
        (["--runner", "threads"], {}, ["runner", "'prefect' or 'plain'"]),
        (
            [],
            {"DEVELOPMENT_ENV_FLOW_DISTRIBUTED_BATCH_SIZE": "0"},
            ["batch_size", "DEVELOPMENT_ENV_FLOW_DISTRIBUTED_BATCH_SIZE"],
        ),
        (
            [],
            {"DEVELOPMENT_ENV_FLOW_DISTRIBUTED_BATCH_SIZE": "lots"},
            ["DEVELOPMENT_ENV_FLOW_DISTRIBUTED_BATCH_SIZE", "'lots'"],
        ),
        # The bad value sits in the environment-wide variable: that is the one to name,
        # not the flow's own (unset) variable.
        (
            [],
            {"DEVELOPMENT_GLOBAL_WORKER_LEASE_SECONDS": "-1"},
            ["lease_seconds", "DEVELOPMENT_GLOBAL_WORKER_LEASE_SECONDS"],
        ),
    ],
    ids=["batch", "concurrency", "lease", "runner", "env-zero", "env-not-a-number", "env-global"],
)
def test_invalid_setting_is_one_line_naming_it(
    dsn: str, options: list[str], env: dict[str, str], says: list[str]
) -> None:
    line = one_line_failure(
        *run_cli(worker_args(dsn, "flowfleet.examples:noop", *options), env)[::2]
    )
    for words in says:
        assert words in line


def test_no_database_configured_is_one_line() -> None:
    args = [a for a in worker_args("x") if a not in {"--dsn", "x"}]
    line = one_line_failure(*run_cli(args)[::2])
    assert "RPA_DB_CONNECTION_STRING" in line


def test_malformed_dsn_is_a_bad_setting_not_an_outage(fleet: Fleet) -> None:
    """A connection string that can never work is stopped at start-up like any bad setting
    (DESIGN 7), not waited on like an outage; and its password is not echoed back."""
    worker = fleet.start(
        FLOW, "flowfleet.examples:noop", "postgresql://me:s3cret-pw@127.0.0.1:notaport/queue"
    )
    code = worker.wait_exit(10)
    line = one_line_failure(code, worker.stderr())
    assert "port" in line
    assert "s3cret-pw" not in worker.stderr()


def test_unreachable_database_at_start_is_waited_for(fleet: Fleet) -> None:
    """Nothing listens at the DSN's port: the worker waits (a restart would only meet the
    same outage), says why on /readyz, stays live on /healthz, and stops on SIGTERM."""
    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    # A short lease makes the keeper's staleness limit (3 heartbeats + 5 s) about 5.3 s.
    worker = fleet.start(FLOW, "flowfleet.examples:noop", dsn, http=True, lease_seconds=0.3)
    worker.wait_http()
    started = time.monotonic()
    answer = wait_until(lambda: (a := worker.get("/readyz")).status == 503 and a, 20, 0.2)
    assert "cannot reach database" in answer.body
    worker.wait_logged("cannot reach database")
    # Alive, only not ready: a failing liveness probe would restart the pod into the
    # outage, the crash loop that waiting is meant to avoid.
    while time.monotonic() - started < 6.5:
        assert worker.alive(), worker.stderr()
        health = worker.get("/healthz")
        assert health.status == 200, (f"{time.monotonic() - started:.1f}s", health.body)
        time.sleep(0.5)
    sent = time.monotonic()
    worker.send(signal.SIGTERM)
    assert worker.wait_exit(15) == 0, worker.stderr()
    assert time.monotonic() - sent < 5
    assert "Traceback" not in worker.stderr()


def test_logs_stay_structured_while_the_database_is_unreachable(fleet: Fleet) -> None:
    """--log-format json: every stderr line is a JSON object carrying flow and instance,
    including what the connection pool has to say about the outage."""
    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    worker = fleet.start(FLOW, "flowfleet.examples:noop", dsn, name="jsonlogs")
    worker.wait_logged("cannot reach database")
    time.sleep(1)
    worker.send(signal.SIGTERM)
    assert worker.wait_exit(15) == 0
    lines = [line for line in worker.stderr().splitlines() if line.strip()]
    assert lines
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON log line: {line!r}")
        assert (entry["flow"], entry["instance"]) == (FLOW, "jsonlogs"), line


@pytest.mark.parametrize(
    ("env", "options", "expected"),
    [
        ({"DEVELOPMENT_ENV_FLOW_DISTRIBUTED_BATCH_SIZE": "7"}, [], 7),
        ({"DEVELOPMENT_GLOBAL_DISTRIBUTED_BATCH_SIZE": "4"}, [], 4),
        ({"GLOBAL_DISTRIBUTED_BATCH_SIZE": "3"}, [], 3),
        ({"DEVELOPMENT_DISTRIBUTED_PROCESSOR_DISTRIBUTED_BATCH_SIZE": "8"}, [], 8),
        (
            {
                "DEVELOPMENT_ENV_FLOW_DISTRIBUTED_BATCH_SIZE": "7",
                "DEVELOPMENT_GLOBAL_DISTRIBUTED_BATCH_SIZE": "4",
                "GLOBAL_DISTRIBUTED_BATCH_SIZE": "3",
            },
            [],
            7,
        ),
        ({"DEVELOPMENT_ENV_FLOW_DISTRIBUTED_BATCH_SIZE": "7"}, ["--batch-size", "5"], 5),
        (
            {
                "PREFECT_ENVIRONMENT": "production",
                "PRODUCTION_ENV_FLOW_DISTRIBUTED_BATCH_SIZE": "6",
                "DEVELOPMENT_ENV_FLOW_DISTRIBUTED_BATCH_SIZE": "7",
            },
            [],
            6,
        ),
    ],
    ids=["flow", "env-global", "global", "shared", "most-specific", "option-wins", "production"],
)
def test_batch_size_from_settings(
    fleet: Fleet,
    dsn: str,
    conn: psycopg.Connection,
    env: dict[str, str],
    options: list[str],
    expected: int,
) -> None:
    enqueue_keys(conn, FLOW, range(20), sleep=0.3)
    worker = fleet.start(
        FLOW, "processors.effects:sleepy", dsn, name="sized", args=options, env=env
    )
    held = wait_until(lambda: in_flight(conn, "sized"), 20, what="a claim")
    assert len(held) == expected
    worker.wait_logged(f"batch_size={expected} ")
    worker.kill()


def test_settings_reach_the_worker_from_env_only(
    fleet: Fleet, dsn: str, conn: psycopg.Connection
) -> None:
    """Entrypoint and runner from the environment too: no options but the flow and DSN."""
    enqueue_keys(conn, FLOW, range(12), sleep=0.3)
    cmd = [sys.executable, "-m", "flowfleet.cli", "worker", FLOW, "--log-format", "json"]
    worker = fleet.run(
        cmd,
        "envonly",
        env={
            "FLOWFLEET_DSN": dsn,
            "DEVELOPMENT_ENV_FLOW_ENTRYPOINT": "processors.effects:sleepy",
            "DEVELOPMENT_ENV_FLOW_WORKER_RUNNER": "plain",
            "DEVELOPMENT_ENV_FLOW_DISTRIBUTED_BATCH_SIZE": "5",
            "DEVELOPMENT_ENV_FLOW_WORKER_HTTP_PORT": "0",
        },
    )
    held = wait_until(lambda: in_flight(conn, "envonly"), 20, what="a claim")
    assert len(held) == 5
    worker.wait_logged("runner=plain batch_size=5 ")
    worker.send(signal.SIGTERM)
    assert worker.wait_exit(10) == 0

"""The worker's one HTTP port: /healthz, /readyz and /metrics, through a database outage."""

from __future__ import annotations

import signal
import time

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from worker_helpers import (
    Fleet,
    WorkerProcess,
    enqueue_keys,
    fleet_fixture,  # noqa: F401 - the fixture `fleet`
    queue_counts,
    wait_until,
)

from flowfleet import queue
from flowfleet.throwaway import ThrowawayPostgres

FLOW = "http_flow"


def samples(body: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def metric(worker: WorkerProcess, name: str, **labels: str) -> float | None:
    return samples(worker.get("/metrics").body).get(
        (name, frozenset({"flow": FLOW, **labels}.items()))
    )


def test_probes_and_metrics(fleet: Fleet, dsn: str, conn: psycopg.Connection) -> None:
    total, poison = 75, {3, 17, 40, 41, 74}
    worker = fleet.start(
        FLOW,
        "processors.effects:poison",
        dsn,
        http=True,
        args=["--batch-size", "10", "--max-retries", "1", "--poll-seconds", "0.5"],
    )
    worker.wait_http()
    worker.wait_logged("worker started")
    for path in ("/healthz", "/readyz"):
        answer = worker.get(path)
        assert (answer.status, answer.body) == (200, "ok\n"), path
    assert worker.get("/nope").status == 404
    assert worker.get("/metrics/").status == 404

    queue.enqueue(conn, FLOW, [{"k": k, "poison": k in poison} for k in range(total)])
    good = total - len(poison)
    wait_until(
        lambda: (
            queue_counts(conn, FLOW)
            == {"pending": 0, "processing": 0, "failed": len(poison), "completed": good}
        ),
        30,
        what="the queue to settle",
    )

    # Counters move as the queue did; queue depth follows at the next sweep (every 2 s).
    wanted = {
        ("flowfleet_records_completed_total", ()): good,
        ("flowfleet_records_failed_total", ()): len(poison),
        ("flowfleet_records_retried_total", ()): len(poison),
        # First attempts as claimed, the retries' claims apart: a record counts once.
        ("flowfleet_records_claimed_total", ()): total,
        ("flowfleet_records_reclaimed_total", ()): len(poison),
        ("flowfleet_records_in_flight", ()): 0,
        ("flowfleet_queue_depth", (("status", "pending"),)): 0,
        ("flowfleet_queue_depth", (("status", "failed"),)): len(poison),
    }

    def settled() -> bool:
        got = samples(worker.get("/metrics").body)
        return all(
            got.get((name, frozenset({"flow": FLOW, **dict(labels)}.items()))) == value
            for (name, labels), value in wanted.items()
        )

    wait_until(settled, 15, 0.2, "the metrics to match the queue")
    answer = worker.get("/metrics")
    assert answer.status == 200
    assert answer.content_type.startswith("text/plain")
    for name in (
        "flowfleet_records_claimed_total",
        "flowfleet_records_completed_total",
        "flowfleet_records_failed_total",
        "flowfleet_records_retried_total",
        "flowfleet_records_in_flight",
        "flowfleet_batch_duration_seconds_bucket",
        f'flowfleet_queue_depth{{flow="{FLOW}",status="pending"}}',
    ):
        assert name in answer.body, name
    batches = metric(worker, "flowfleet_batch_duration_seconds_count")
    assert batches is not None and batches >= total / 10

    worker.send(signal.SIGTERM)
    assert worker.wait_exit(10) == 0, worker.stderr()


@pytest.fixture
def own_database(pg_server: ThrowawayPostgres) -> tuple[str, str]:
    """(name, dsn) of a migrated database that this test may take away."""
    name = f"outage_{time.monotonic_ns()}"
    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name} TEMPLATE flowfleet_template")
    return name, pg_server.dsn(name)


def admin(pg_server: ThrowawayPostgres, statement: str) -> None:
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute(statement)


def cut_off(pg_server: ThrowawayPostgres, name: str) -> None:
    """The database refuses new connections and every session on it is cut."""
    admin(pg_server, f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false")
    admin(
        pg_server,
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'",
    )


def wait_not_ready(worker: WorkerProcess) -> str:
    answer = wait_until(
        lambda: (a := worker.get("/readyz")).status == 503 and a, 20, 0.2, "/readyz to fail"
    )
    return answer.body


def test_readiness_follows_an_outage_and_work_resumes(
    fleet: Fleet, pg_server: ThrowawayPostgres, own_database: tuple[str, str]
) -> None:
    name, dsn = own_database
    worker = fleet.start(
        FLOW, "processors.effects:sleepy", dsn, http=True, args=["--poll-seconds", "0.5"]
    )
    worker.wait_http()
    wait_until(lambda: worker.get("/readyz").status == 200, 20, what="ready")
    with psycopg.connect(dsn, autocommit=True) as conn:
        enqueue_keys(conn, FLOW, range(10))
        wait_until(lambda: queue_counts(conn, FLOW)["completed"] == 10, 20)

    cut_off(pg_server, name)
    body = wait_not_ready(worker)
    assert "cannot reach database" in body
    assert f"/{name}" in body  # names the database by location; never the DSN itself
    assert dsn not in body
    # Waited out, not crashed on.
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        assert worker.alive(), worker.stderr()
        time.sleep(0.2)

    admin(pg_server, f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS true")
    wait_until(lambda: worker.get("/readyz").status == 200, 20, 0.2, "/readyz to recover")
    with psycopg.connect(dsn, autocommit=True) as conn:
        enqueue_keys(conn, FLOW, range(10, 20))
        # The claim loop reconnects with a backoff that grew during the outage.
        wait_until(lambda: queue_counts(conn, FLOW)["completed"] == 20, 45, 0.2, "work after")
    assert worker.get("/healthz").status == 200

    worker.send(signal.SIGTERM)
    assert worker.wait_exit(10) == 0, worker.stderr()


def test_dropped_database_fails_readiness_not_liveness(
    fleet: Fleet, pg_server: ThrowawayPostgres, own_database: tuple[str, str]
) -> None:
    name, dsn = own_database
    worker = fleet.start(FLOW, "processors.effects:sleepy", dsn, http=True)
    worker.wait_http()
    wait_until(lambda: worker.get("/readyz").status == 200, 20, what="ready")

    admin(pg_server, f"DROP DATABASE {name} WITH (FORCE)")
    gone = time.monotonic()
    assert f"/{name}" in wait_not_ready(worker)
    # Liveness is not readiness. An unreachable database is waited out (a restarted pod
    # would only meet the same outage), so /healthz stays 200 and the process stays up:
    # watched past the keeper's staleness limit (3 heartbeats + 5 s = 7 s at a 2 s lease).
    while time.monotonic() - gone < 10:
        assert worker.alive(), worker.stderr()
        health = worker.get("/healthz")
        assert (health.status, health.body) == (200, "ok\n"), (
            f"{time.monotonic() - gone:.1f}s into the outage"
        )
        time.sleep(0.5)
    worker.send(signal.SIGTERM)
    assert worker.wait_exit(10) == 0, worker.stderr()
    assert "Traceback" not in worker.stderr()

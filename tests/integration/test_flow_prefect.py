"""The Prefect side: the worker's Prefect runner against a real Prefect server, the seed's
``distributed_processing_flow`` called in-process, and the seed's Pattern 3."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest_prefect import prefect_api_fixture  # noqa: F401 - fixture
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import FlowRun, TaskRun
from processors.effects import poison as poison_processor
from worker_helpers import (
    Fleet,
    enqueue_keys,
    fleet_fixture,  # noqa: F401 - the fixture `fleet`
    queue_counts,
    wait_until,
)

from flowfleet import queue
from flowfleet.database import DatabaseManager
from flowfleet.distributed import DistributedProcessor
from flowfleet.flow_template import distributed_processing_flow
from flowfleet.throwaway import ThrowawayPrefect, free_port

pytestmark = pytest.mark.slow


def flow_runs(flow_name: str) -> list[FlowRun]:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])), limit=200
        )


def task_runs(runs: list[FlowRun]) -> list[TaskRun]:
    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in runs])),
            limit=200,
        )


def settled_task_runs(
    runs: list[FlowRun], named: str, enough: int, done: Callable[[TaskRun], bool]
) -> list[TaskRun]:
    """Task runs reach the API through events, a little after the flow run ends."""

    def check() -> list[TaskRun]:
        found = [t for t in task_runs(runs) if t.name.startswith(named)]
        return found if len(found) >= enough and all(done(t) for t in found) else []

    return wait_until(check, 30, 0.5, f"{enough} finished {named!r} task runs")


def is_completed(run: FlowRun | TaskRun) -> bool:
    return run.state is not None and run.state.is_completed()


def history(conn: psycopg.Connection, flow: str) -> dict[int, Any]:
    return {
        int(row[0]): row[1]
        for row in conn.execute(
            "SELECT payload->>'k', result FROM processing_history WHERE flow_name = %s",
            (flow,),
        )
    }


def failed(conn: psycopg.Connection, flow: str) -> dict[int, tuple[int, str]]:
    return {
        int(row[0]): (row[1], row[2])
        for row in conn.execute(
            "SELECT payload->>'k', retry_count, error_message FROM processing_queue"
            " WHERE flow_name = %s AND status = 'failed'",
            (flow,),
        )
    }


def test_prefect_runner_drains_the_queue_and_reports_to_prefect(
    prefect_api: ThrowawayPrefect, fleet: Fleet, dsn: str, conn: psycopg.Connection
) -> None:
    flow, total = "prefect_runner_flow", 200
    poison = set(range(7, total, 20))
    queue.enqueue(conn, flow, [{"k": k, "poison": k in poison} for k in range(total)])
    worker = fleet.start(
        flow,
        "processors.effects:poison",
        dsn,
        runner="prefect",
        args=[
            "--batch-size",
            "25",
            "--max-retries",
            "1",
            "--exit-when-empty",
            "--poll-seconds",
            "0.2",
        ],
        env=prefect_api.env(),
    )
    assert worker.wait_exit(120) == 0, worker.stderr()

    good = set(range(total)) - poison
    assert set(history(conn, flow)) == good  # the rest of every poisoned batch completed
    assert failed(conn, flow) == {k: (1, f"ValueError: poison record {k}") for k in poison}
    assert queue_counts(conn, flow) == {
        "pending": 0,
        "processing": 0,
        "failed": len(poison),
        "completed": len(good),
    }

    runs = flow_runs(flow)
    assert runs, "no flow runs under the flow's own name"
    assert all(is_completed(r) for r in runs), [r.state for r in runs]
    assert {r.parameters.get("instance_id") for r in runs} == {worker.name}
    # A task run per batch: 8 first claims of 25, plus the retries' batches.
    batches = settled_task_runs(
        runs, "process-records", total // 25, lambda t: t.state is not None and t.state.is_final()
    )
    # The first claims complete; a batch of retried poison records alone fails whole.
    states = [(t.state.type.value, t.state.name) for t in batches if t.state]
    assert set(states) <= {("COMPLETED", "Completed"), ("FAILED", "RecordsFailed")}, states
    assert states.count(("COMPLETED", "Completed")) >= total // 25, states


def test_prefect_task_processor_gets_a_task_run_per_record(
    prefect_api: ThrowawayPrefect, fleet: Fleet, dsn: str, conn: psycopg.Connection
) -> None:
    flow, total = "prefect_task_flow", 12
    queue.enqueue(conn, flow, [{"k": k, "poison": k == 5} for k in range(total)])
    worker = fleet.start(
        flow,
        "processors.prefect_tasks:check_record",
        dsn,
        runner="prefect",
        args=["--batch-size", "6", "--max-retries", "0", "--exit-when-empty"],
        env=prefect_api.env(),
    )
    assert worker.wait_exit(120) == 0, worker.stderr()
    assert set(history(conn, flow)) == set(range(total)) - {5}
    assert failed(conn, flow) == {5: (0, "ValueError: poison record 5")}

    runs = flow_runs(flow)
    checks = settled_task_runs(
        runs, "check-record", total, lambda t: t.state is not None and t.state.is_final()
    )
    assert len(checks) == total
    assert sorted(t.state.type.value for t in checks if t.state) == ["COMPLETED"] * 11 + ["FAILED"]
    assert len(settled_task_runs(runs, "process-records", 2, is_completed)) == 2


def test_distributed_processing_flow_in_process(
    prefect_api: ThrowawayPrefect,
    dsn: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    flow = "in_process_flow"
    monkeypatch.delenv("PREFECT_ENVIRONMENT", raising=False)
    # Retried records wait an hour, so each call's claim is exactly predictable.
    monkeypatch.setenv("DEVELOPMENT_DISTRIBUTED_PROCESSOR_RETRY_BACKOFF_SECONDS", "3600")
    db = DatabaseManager("queue", connection_string=dsn)
    poison = {2, 11}
    queue.enqueue(conn, flow, [{"k": k, "poison": k in poison} for k in range(30)])

    def run() -> dict[str, Any]:
        return distributed_processing_flow(flow, batch_size=25, processor=poison_processor, db=db)

    first = run()
    assert {k: v for k, v in first.items() if k != "instance_id"} == {
        "flow_name": flow,
        "claimed": 25,
        "completed": 23,
        "retried": 2,
        "failed": 0,
        "fenced": 0,
        "released": 0,
    }
    assert set(history(conn, flow)) == set(range(25)) - poison
    retrying = conn.execute(
        "SELECT payload->>'k', status, retry_count, error_message, flow_instance_id"
        " FROM processing_queue WHERE retry_count > 0 ORDER BY id"
    ).fetchall()
    assert retrying == [
        (str(k), "pending", 1, f"ValueError: poison record {k}", None) for k in sorted(poison)
    ]
    assert conn.execute(
        "SELECT DISTINCT flow_instance_id FROM processing_history WHERE flow_name = %s", (flow,)
    ).fetchall() == [(first["instance_id"],)]

    second = run()
    assert (second["claimed"], second["completed"], second["retried"]) == (5, 5, 0)
    third = run()
    assert (third["claimed"], third["completed"]) == (0, 0)
    assert queue_counts(conn, flow) == {
        "pending": 2,
        "processing": 0,
        "failed": 0,
        "completed": 28,
    }

    runs = flow_runs("distributed-processing")
    mine = [r for r in runs if r.parameters.get("flow_name") == flow]
    assert len(mine) == 3 and all(is_completed(r) for r in mine), [r.state for r in mine]
    # Two calls had records, so two batches; the empty claim runs no task.
    assert len(settled_task_runs(mine, "process-records", 2, is_completed)) == 2
    db.close()


def test_seed_pattern_3_existing_flow_migration(
    prefect_api: ThrowawayPrefect,
    db: DatabaseManager,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from processors.pattern3 import my_flow

    DistributedProcessor(db).add_records_to_queue("my_flow", [{"k": k} for k in range(10)])

    # Not switched on: the flow's original logic, the queue untouched.
    assert my_flow() == {"mode": "original"}
    assert queue_counts(conn, "my_flow")["pending"] == 10

    monkeypatch.setenv("DEVELOPMENT_MY_FLOW_USE_DISTRIBUTED_PROCESSING", "true")
    monkeypatch.setenv("DEVELOPMENT_MY_FLOW_DISTRIBUTED_BATCH_SIZE", "7")
    first = my_flow()
    assert (first["flow_name"], first["claimed"], first["completed"]) == ("my_flow", 7, 7)
    second = my_flow(batch_size=50)
    assert (second["claimed"], second["completed"]) == (3, 3)
    # The registered processor ran for every record, and its results were kept.
    assert history(conn, "my_flow") == {k: {"doubled": 2 * k} for k in range(10)}
    assert my_flow(use_distributed=True)["claimed"] == 0

    runs = flow_runs("my-existing-flow")
    assert len(runs) == 4 and all(is_completed(r) for r in runs)
    subflows = flow_runs("distributed-processing")
    assert len([r for r in subflows if r.parameters.get("flow_name") == "my_flow"]) == 3


def test_prefect_api_outage_hands_batches_back_untouched(
    prefect_api: ThrowawayPrefect, fleet: Fleet, dsn: str, conn: psycopg.Connection, tmp_path: Path
) -> None:
    """With its Prefect API unreachable, the Prefect runner cannot start a flow run: the
    claimed batch goes back as it was (no retry spent, nothing failed), the worker stays
    up, and a worker that can reach Prefect later does the work."""
    flow = "prefect_outage_flow"
    enqueue_keys(conn, flow, range(10))
    cut_off = fleet.start(
        flow,
        "processors.effects:sleepy",
        dsn,
        runner="prefect",
        name="cut-off",
        http=True,
        args=["--batch-size", "10"],
        env={
            "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api",
            "PREFECT_HOME": str(tmp_path),
            "PREFECT_CLIENT_MAX_RETRIES": "0",  # fail fast; the worker retries itself
        },
    )
    cut_off.wait_logged("claim loop error", timeout=60)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        rows = conn.execute(
            "SELECT status, retry_count, error_message FROM processing_queue WHERE flow_name = %s",
            (flow,),
        ).fetchall()
        assert len(rows) == 10
        assert {(status in {"pending", "processing"}, r, e) for status, r, e in rows} == {
            (True, 0, None)
        }
        assert cut_off.get("/healthz").status == 200
        time.sleep(0.2)
    cut_off.send(signal.SIGTERM)
    assert cut_off.wait_exit(15) == 0, cut_off.stderr()
    assert queue_counts(conn, flow) == {"pending": 10, "processing": 0, "failed": 0, "completed": 0}

    rescuer = fleet.start(
        flow,
        "processors.effects:sleepy",
        dsn,
        runner="prefect",
        args=["--exit-when-empty"],
        env=prefect_api.env(),
    )
    assert rescuer.wait_exit(60) == 0, rescuer.stderr()
    assert set(history(conn, flow)) == set(range(10))

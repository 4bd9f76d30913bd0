"""The Prefect runner as an operator meets it: one start-up line naming the Prefect API,
flow runs named and tagged after the flow and the pod, a batch whose records all failed
shown as failed, /readyz saying when the Prefect API is out of reach, and the temporary
server's output in the worker's own log format."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import psycopg
import pytest
from conftest_prefect import prefect_api_fixture  # noqa: F401 - fixture
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun, TaskRun
from prometheus_client.parser import text_string_to_metric_families
from worker_helpers import (
    Fleet,
    WorkerProcess,
    fleet_fixture,  # noqa: F401 - the fixture `fleet`
    queue_counts,
    wait_until,
)

from flowfleet import queue
from flowfleet.prefect_api import answers
from flowfleet.throwaway import ThrowawayPrefect, free_port

pytestmark = pytest.mark.slow


def flow_runs(flow_name: str, tag: str | None = None) -> list[FlowRun]:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            flow_run_filter=(
                FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])) if tag is not None else None
            ),
            limit=200,
        )


def final_task_runs(runs: list[FlowRun], enough: int) -> list[TaskRun]:
    """Task runs reach the API through events, a little after their flow run ends."""

    def check() -> list[TaskRun]:
        with get_client(sync_client=True) as client:
            found = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in runs])),
                limit=200,
            )
        done = [t for t in found if t.state is not None and t.state.is_final()]
        return done if len(done) >= enough else []

    return wait_until(check, 30, 0.5, f"{enough} finished task runs")


def test_flow_runs_named_and_tagged_by_pod_and_all_failed_batches_fail(
    prefect_api: ThrowawayPrefect, fleet: Fleet, dsn: str, conn: psycopg.Connection
) -> None:
    flow = "prefect_ux_flow"
    # Claims go by id: the first batch of 5 succeeds, the second fails record by record.
    queue.enqueue(conn, flow, [{"k": k, "poison": k >= 5} for k in range(10)])
    worker = fleet.start(
        flow,
        "processors.effects:poison",
        dsn,
        runner="prefect",
        name="ux-pod-1",
        http=True,
        args=["--batch-size", "5", "--max-retries", "0"],
        env=prefect_api.env(),
    )
    worker.wait_logged("worker started", timeout=60)
    line = next(e for e in worker.logs() if e["msg"].startswith("Prefect API: "))
    assert line["msg"] == f"Prefect API: {prefect_api.url} (from PREFECT_API_URL)"
    assert line["prefect_api_url"] == prefect_api.url
    wait_until(lambda: queue_counts(conn, flow)["failed"] == 5, 60, 0.2, "the batches to run")
    assert worker.get("/readyz").body == "ok\n"
    worker.send(signal.SIGTERM)
    assert worker.wait_exit(30) == 0, worker.stderr()

    runs = flow_runs(flow)
    assert runs
    assert {r.name for r in runs} == {f"{flow}@ux-pod-1"}
    assert all({"flowfleet", f"flow:{flow}", "pod:ux-pod-1"} <= set(r.tags) for r in runs)
    # Filterable by pod: a tag filter finds them, another pod's tag finds none.
    assert {r.id for r in flow_runs(flow, tag="pod:ux-pod-1")} == {r.id for r in runs}
    assert flow_runs(flow, tag="pod:some-other-pod") == []

    batches = [t for t in final_task_runs(runs, 2) if t.name.startswith("process-records")]
    states = sorted((t.state.type.value, t.state.name) for t in batches if t.state)
    assert states == [("COMPLETED", "Completed"), ("FAILED", "RecordsFailed")]
    failed = next(t for t in batches if t.state and t.state.name == "RecordsFailed")
    assert failed.state is not None
    assert failed.state.message == "all 5 records failed: 5 for good, 0 to be retried"
    # The flow run itself still completed: the worker did its job, the records did not.
    assert all(r.state is not None and r.state.is_completed() for r in runs)


def metric(worker: WorkerProcess, name: str) -> float | None:
    body = worker.get("/metrics").body
    found = [
        s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
        if s.name == name
    ]
    return found[0] if found else None


def test_readyz_says_when_the_prefect_api_is_unreachable(
    fleet: Fleet, dsn: str, conn: psycopg.Connection, tmp_path: Path
) -> None:
    """And the batch each failed attempt hands back is counted as released, its next
    claim as a re-claim, not as more records claimed."""
    flow = "prefect_unreachable_flow"
    url = f"http://127.0.0.1:{free_port()}/api"
    queue.enqueue(conn, flow, [{"k": k} for k in range(4)])
    worker = fleet.start(
        flow,
        "processors.effects:sleepy",
        dsn,
        runner="prefect",
        http=True,
        env={
            "PREFECT_API_URL": url,
            "PREFECT_HOME": str(tmp_path),
            "PREFECT_CLIENT_MAX_RETRIES": "0",
        },
    )
    worker.wait_logged("worker started", timeout=60)
    assert worker.logged(f"Prefect API: {url} (from PREFECT_API_URL)")
    ready = worker.get("/readyz")
    assert ready.status == 503
    assert ready.body.startswith(f"Prefect API at {url} unreachable: ConnectError"), ready.body
    assert ready.body.count("\n") == 1
    # Alive all the same: a restart would not bring the Prefect API back.
    assert worker.get("/healthz").status == 200

    def handed_back_twice() -> bool:
        return (metric(worker, "flowfleet_records_released_total") or 0) >= 8

    wait_until(handed_back_twice, 30, 0.2, "two failed attempts to hand their batch back")
    assert metric(worker, "flowfleet_records_claimed_total") == 4
    reclaimed = metric(worker, "flowfleet_records_reclaimed_total")
    assert reclaimed is not None and reclaimed >= 4
    worker.send(signal.SIGTERM)
    assert worker.wait_exit(30) == 0, worker.stderr()


def test_without_prefect_api_url_a_temporary_server_said_and_logged_as_json(
    fleet: Fleet, dsn: str, conn: psycopg.Connection, tmp_path: Path
) -> None:
    flow = "prefect_temporary_flow"
    queue.enqueue(conn, flow, [{"k": k} for k in range(3)])
    worker = fleet.start(
        flow,
        "processors.effects:sleepy",
        dsn,
        runner="prefect",
        http=True,
        args=["--exit-when-empty"],
        env={"PREFECT_HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path)},
    )
    assert worker.wait_exit(180) == 0, worker.stderr()
    assert queue_counts(conn, flow)["completed"] == 3

    lines = worker.stderr().splitlines()
    # Every line in the worker's format: nothing from the temporary server comes raw.
    entries = [json.loads(line) for line in lines]
    said = [e for e in entries if e["msg"].startswith("Prefect API: ")]
    assert len(said) == 1, lines
    assert said[0]["msg"].startswith(
        "Prefect API: none configured; starting a temporary local server for this worker "
        "alone at http://127.0.0.1:"
    )
    assert (
        "its runs are visible nowhere else and are deleted when the worker stops"
        in (said[0]["msg"])
    )
    assert "set PREFECT_API_URL to a Prefect server's API" in said[0]["msg"]
    assert said[0]["prefect_api_url"] is None
    # The runs went to the temporary server, whose database is gone with it.
    assert not list(tmp_path.glob("flowfleet-prefect-*"))
    assert not (tmp_path / "home" / "prefect.db").exists()


def test_a_killed_worker_leaves_no_temporary_server_behind(
    fleet: Fleet, dsn: str, tmp_path: Path
) -> None:
    worker = fleet.start(
        "prefect_killed_flow",
        "processors.effects:sleepy",
        dsn,
        runner="prefect",
        env={"PREFECT_HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path)},
    )
    worker.wait_logged("worker started", timeout=120)
    said = next(e for e in worker.logs() if e["msg"].startswith("Prefect API: "))
    url = said["msg"].split(" at ", 1)[1].split("/api", 1)[0] + "/api"
    assert answers(url) == (True, "ok")
    worker.kill()
    wait_until(lambda: not answers(url, timeout=1.0)[0], 15, 0.5, "the server to go")
    wait_until(
        lambda: not list(tmp_path.glob("flowfleet-prefect-*")), 10, 0.5, "its database to go"
    )

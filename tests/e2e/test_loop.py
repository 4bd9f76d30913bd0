"""The whole loop on one machine: `kubectl apply` a DistributedFlow, the real operator
(under the chart's ServiceAccount) scales a worker Deployment, the local node runs its
pods as real `flowfleet worker` processes against a real PostgreSQL, and the queue
drains; with faults thrown in. Every scenario ends with every record executed exactly
once (loop_effects rows are written in the completing transaction), none lost, nothing
left processing. Leases are long (60 s) so that every return of a claim seen here comes
from the loop itself, never from a lease running out.
"""

from __future__ import annotations

import signal
import time

import pytest

from flowfleet.throwaway import ThrowawayPrefect

from .conftest import wait_until
from .localnode_fixtures import restart_postgres
from .loop_fixtures import FLOW, Loop

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def keys_of(n: int, prefix: str = "r") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def payloads(keys: list[str], sleep: float) -> list[dict[str, object]]:
    return [{"k": k, "sleep": sleep} for k in keys]


def test_burst_scales_up_drains_and_goes_back_to_zero(loop: Loop) -> None:
    loop.apply_flow(maxReplicas=3, recordsPerReplica=10)
    wait_until(lambda: loop.deployment_replicas() == 0, timeout=30, what="Deployment at 0")
    keys = keys_of(60)
    loop.enqueue(payloads(keys, 0.2))
    enqueued = time.monotonic()
    peak = 0
    while loop.counts()["completed"] < len(keys):
        assert time.monotonic() - enqueued < 90, f"not drained: {loop.counts()}"
        peak = max(peak, len(loop.running_pods()))
        time.sleep(0.2)
    drained = time.monotonic()
    assert peak == 3, f"peak Running pods {peak}, wanted 0 -> 3"
    loop.wait_no_pods(timeout=40)
    # Held for scaleDownDelaySeconds (2 s) after the queue emptied.
    assert time.monotonic() - drained >= 1.5
    assert loop.deployment_replicas() == 0
    loop.assert_exactly_once(keys)
    wait_until(
        lambda: loop.flow_status().get("pendingRecords") == 0, timeout=10, what="status at 0"
    )


def test_force_deleted_pod_claims_are_pending_again_within_2s(loop: Loop) -> None:
    loop.apply_flow(maxReplicas=2, recordsPerReplica=10, batchSize=4)
    keys = keys_of(40)
    loop.enqueue(payloads(keys, 0.5))
    pods = loop.wait_running(2)
    victim = pods[0].metadata.name
    held = wait_until(lambda: loop.claims(victim), timeout=30, what=f"{victim} holding records")
    loop.kubectl("delete", "pod", victim, "--grace-period=0", "--force", "--wait=false")
    deleted = time.monotonic()
    wait_until(
        lambda: not set(loop.claims(victim)) & set(held),
        timeout=10,
        interval=0.05,
        what=f"{victim}'s records back in the queue",
    )
    returned_in = time.monotonic() - deleted
    assert returned_in < 2.0, f"{len(held)} records returned after {returned_in:.2f}s"
    loop.wait_drained(len(keys))
    loop.assert_exactly_once(keys)
    loop.wait_no_pods(timeout=40)


def test_scale_in_removes_the_idle_pods_and_spares_the_busy_ones(loop: Loop) -> None:
    loop.apply_flow(
        maxReplicas=4, recordsPerReplica=1, batchSize=1, concurrency=1, scaleDownDelaySeconds=1
    )
    long_keys = keys_of(2, "long")
    short_keys = keys_of(24, "short")
    # Claims go in insertion order: the first two pods to claim take the long records.
    loop.enqueue(payloads(long_keys, 25))
    loop.enqueue(payloads(short_keys, 0.2))
    loop.wait_running(4)

    def holders() -> dict[str, str]:
        with loop.conn() as conn:
            rows = conn.execute(
                "SELECT payload->>'k', flow_instance_id FROM processing_queue"
                " WHERE status = 'processing' AND payload->>'k' LIKE 'long%'"
            ).fetchall()
        return {str(k): str(pod) for k, pod in rows}

    busy = wait_until(lambda: len(h := holders()) == 2 and h, timeout=30, what="long records")
    busy_pods = set(busy.values())
    assert len(busy_pods) == 2
    # The shorts drain; the fleet comes down to the 2 replicas the long records need.
    try:
        survivors = wait_until(
            lambda: len(p := loop.pods()) == 2 and {x.metadata.name for x in p},
            timeout=40,
            interval=0.2,
            what="scale-in to 2 pods",
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{loop.describe()}") from None
    assert holders() == busy, "a long record moved while it ran"
    assert survivors == busy_pods, f"kept {survivors}, the busy pods were {busy_pods}"
    for pod in loop.pods():
        (state,) = pod.status.container_statuses
        assert state.restart_count == 0
    loop.wait_drained(len(long_keys) + len(short_keys), timeout=60)
    loop.assert_exactly_once(long_keys + short_keys)
    with loop.conn() as conn:
        ran = dict(conn.execute("SELECT k, pod FROM loop_effects WHERE k LIKE 'long%'"))
    assert ran == busy, "the long records finished where they started"
    loop.wait_no_pods(timeout=40)


def test_crashed_worker_restarts_in_its_pod_and_returns_its_claims(loop: Loop) -> None:
    loop.apply_flow(maxReplicas=1, recordsPerReplica=100, batchSize=4)
    keys = keys_of(24)
    loop.enqueue(payloads(keys, 0.5))
    (pod,) = loop.wait_running(1)
    name, uid = pod.metadata.name, pod.metadata.uid
    held = wait_until(lambda: loop.claims(name), timeout=30, what=f"{name} holding records")
    loop.node.kill_container(loop.namespace, name, sig=signal.SIGKILL)
    killed = time.monotonic()

    def returned() -> bool:
        # Pending again, or claimed anew (a new token) by the restarted process.
        now = loop.claims(name)
        return all(now.get(i) != token for i, token in held.items())

    wait_until(returned, timeout=20, interval=0.1, what="the crashed process's claims back")
    returned_in = time.monotonic() - killed
    assert returned_in < 15, f"claims came back after {returned_in:.1f}s (lease is 60 s)"
    restarted = loop.core.read_namespaced_pod(name, loop.namespace)
    assert restarted.metadata.uid == uid
    assert restarted.status.container_statuses[0].restart_count == 1
    loop.wait_drained(len(keys), timeout=60)
    loop.assert_exactly_once(keys)
    loop.wait_no_pods(timeout=40)


def test_operator_killed_and_restarted_mid_drain(loop: Loop) -> None:
    loop.apply_flow(maxReplicas=2, recordsPerReplica=10)
    keys = keys_of(40)
    loop.enqueue(payloads(keys, 0.3))
    loop.wait_running(2)
    assert loop.op.proc is not None
    loop.op.proc.kill()
    loop.op.proc.wait()
    loop.op.proc = None
    time.sleep(1)
    loop.op.start()
    loop.wait_drained(len(keys), timeout=60)
    loop.assert_exactly_once(keys)
    loop.wait_no_pods(timeout=40)
    deployments = loop.apps.list_namespaced_deployment(loop.namespace).items
    assert [d.metadata.name for d in deployments] == ["survey"]


def test_postgres_restart_mid_drain(loop: Loop) -> None:
    loop.apply_flow(maxReplicas=2, recordsPerReplica=10)
    keys = keys_of(40)
    loop.enqueue(payloads(keys, 0.3))
    loop.wait_running(2)
    wait_until(lambda: loop.counts()["completed"] >= 4, timeout=30, what="some completed")
    restart_postgres(loop.pg.server)
    loop.wait_drained(len(keys), timeout=90)
    loop.assert_exactly_once(keys)
    # Back to zero: the operator read the depth again after the restart.
    loop.wait_no_pods(timeout=40)
    conditions = {c["type"]: c["status"] for c in loop.flow_status()["conditions"]}
    assert conditions["DatabaseReachable"] == "True"


def test_delete_dflow_mid_drain_keeps_the_queue(loop: Loop) -> None:
    loop.apply_flow(maxReplicas=2, recordsPerReplica=10, gracePeriodSeconds=10)
    keys = keys_of(60)
    loop.enqueue(payloads(keys, 0.3))
    loop.wait_running(2)
    wait_until(lambda: loop.counts()["completed"] >= 4, timeout=30, what="some completed")
    loop.kubectl("delete", "dflow", "survey", "--wait=true", "--timeout=60s")
    loop.wait_no_pods(timeout=60)
    assert loop.deployment_replicas() is None
    counts = loop.counts()
    assert counts["processing"] == 0 and counts["failed"] == 0, counts
    assert counts["completed"] + counts["pending"] == len(keys), counts
    assert 0 < counts["pending"], "the queue was to keep the rest"
    executions = loop.executions()
    assert len(executions) == counts["completed"]
    assert set(executions.values()) == {1}


@pytest.mark.timeout(180)
def test_prefect_runner_reports_flow_runs_named_and_tagged(
    loop: Loop, loop_prefect: ThrowawayPrefect
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.objects import FlowRun

    loop.apply_flow(
        runner="prefect", maxReplicas=1, recordsPerReplica=100, prefect={"apiUrl": loop_prefect.url}
    )
    keys = keys_of(12)
    loop.enqueue(payloads(keys, 0.05))
    (pod,) = loop.wait_running(1, timeout=90)
    loop.wait_drained(len(keys), timeout=120)
    loop.assert_exactly_once(keys)

    def runs() -> list[FlowRun]:
        with get_client(sync_client=True) as client:
            found = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW])), limit=50
            )
        return [r for r in found if r.state is not None and r.state.is_final()]

    found = wait_until(runs, timeout=30, interval=0.5, what="finished Prefect flow runs")
    name = pod.metadata.name
    for run in found:
        assert run.name == f"{FLOW}@{name}"
        assert f"pod:{name}" in run.tags and f"flow:{FLOW}" in run.tags
    loop.wait_no_pods(timeout=40)

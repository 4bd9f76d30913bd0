"""The local node on the real control plane: the scheduler binds a Deployment's pods to
it, they run as real worker processes against a real PostgreSQL, and every way a pod
can end (crash, normal delete, force delete, the node stopping) leaves nothing behind:
no process, nothing Terminating."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from kubernetes import client, utils

from flowfleet import queue
from flowfleet.throwaway import ThrowawayPostgres

from .conftest import REPO, ControlPlane, wait_until
from .localnode_fixtures import (
    LocalNode,
    dsn_secret,
    migrated_database,
    restart_postgres,
    start_local_node,
    stop_local_node,
    terminating_pods,
    wait_dead,
    wait_gone,
    wait_pods,
    worker_deployment,
)

FLOW = "survey_processor"
ENTRYPOINT = "flowfleet.examples:record_effect"  # one effect row per completion
WORKER_ARGS = ("--poll-seconds", "0.2", "--batch-size", "20")
SELECTOR = "app=workers"


@dataclass
class Fleet:
    core: Any
    namespace: str
    dsn: str
    node: LocalNode

    def pods(self, count: int, **kw: Any) -> list[Any]:
        return wait_pods(self.core, self.namespace, SELECTOR, count, **kw)


def apply(api: Any, namespace: str, *docs: dict[str, Any]) -> None:
    for doc in docs:
        utils.create_from_dict(api, doc, namespace=namespace)


@pytest.fixture
def fleet(
    api: Any, namespace: str, local_node: LocalNode, localnode_pg: ThrowawayPostgres
) -> Iterator[Fleet]:
    """Two worker pods on the session's node, Running and Ready, on a fresh database."""
    dsn = migrated_database(localnode_pg)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE example_effects (record_key text NOT NULL)")
    core = client.CoreV1Api(api)
    core.create_namespaced_config_map(
        namespace,
        {"metadata": {"name": "tuning"}, "data": {"batch": "20"}},
    )
    extra_env = (
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {
            "name": "TUNED_BATCH",
            "valueFrom": {"configMapKeyRef": {"name": "tuning", "key": "batch"}},
        },
        {"name": "GREETING", "value": "hello $(POD_NAME)"},
    )
    apply(
        api,
        namespace,
        dsn_secret("queue-db", dsn),
        worker_deployment(
            "workers",
            FLOW,
            ENTRYPOINT,
            "queue-db",
            2,
            node=local_node,
            worker_args=WORKER_ARGS,
            env=extra_env,
            grace_seconds=10,
        ),
    )
    yield Fleet(core, namespace, dsn, local_node)
    # Scale to zero before the namespace goes, so no process outlives the test.
    client.AppsV1Api(api).patch_namespaced_deployment_scale(
        "workers", namespace, {"spec": {"replicas": 0}}
    )
    wait_until(
        lambda: not core.list_namespaced_pod(namespace, label_selector=SELECTOR).items,
        timeout=60,
        what="pods gone after scale to zero",
    )


def test_node_registered_ready_with_lease(api: Any, local_node: LocalNode) -> None:
    core = client.CoreV1Api(api)
    node = core.read_node(local_node.name)
    ready = {c.type: c.status for c in node.status.conditions}
    assert ready["Ready"] == "True"
    assert node.status.capacity["cpu"] == str(os.cpu_count())
    assert node.status.node_info.kubelet_version.startswith("v1.")
    assert {"type": "InternalIP", "address": "127.0.0.1"} in [
        a.to_dict() for a in node.status.addresses
    ]
    # Schedulable: the admission plugin's not-ready taint is gone.
    assert not [t for t in node.spec.taints or [] if t.key == "node.kubernetes.io/not-ready"]
    lease = client.CoordinationV1Api(api).read_namespaced_lease(local_node.name, "kube-node-lease")
    assert lease.spec.holder_identity == local_node.name
    assert lease.metadata.owner_references[0].uid == node.metadata.uid


def test_deployment_pods_run_and_drain_exactly_once(fleet: Fleet) -> None:
    pods = fleet.pods(2)
    names = {p.metadata.name for p in pods}
    for pod in pods:
        assert pod.spec.node_name == fleet.node.name
        status = pod.status.container_statuses[0]
        assert status.ready and status.started and status.state.running is not None
        assert status.restart_count == 0
        # The worker listens on the local port mapped to containerPort 8080.
        port = fleet.node.local_port(fleet.namespace, pod.metadata.name)
        assert port != 8080
        pid = fleet.node.container_pid(fleet.namespace, pod.metadata.name)
        assert pid is not None
        env = dict(
            item.split("=", 1)
            for item in Path(f"/proc/{pid}/environ").read_text().split("\0")
            if "=" in item
        )
        assert env["POD_NAME"] == pod.metadata.name
        assert env["POD_NAMESPACE"] == fleet.namespace
        assert env["TUNED_BATCH"] == "20"
        assert env["GREETING"] == f"hello {pod.metadata.name}"
        assert env["FLOWFLEET_DSN"] == fleet.dsn
        assert "KUBERNETES_SERVICE_HOST" not in env

    records = 400
    with psycopg.connect(fleet.dsn, autocommit=True) as conn:
        queue.enqueue(conn, FLOW, [{"n": n} for n in range(records)])
        wait_until(
            lambda: (
                conn.execute(
                    "SELECT count(*) FROM processing_history WHERE status = 'completed'"
                ).fetchone()[0]
                == records
            ),
            timeout=60,
            what="all records completed",
        )
        assert conn.execute("SELECT count(*) FROM processing_queue").fetchone()[0] == 0
        effects = dict(
            conn.execute(
                "SELECT record_key, count(*) FROM example_effects GROUP BY record_key"
            ).fetchall()
        )
        instances = {
            row[0]
            for row in conn.execute("SELECT DISTINCT flow_instance_id FROM processing_history")
        }
    assert effects == {str(n): 1 for n in range(records)}
    assert instances and instances <= names


def test_crashed_process_restarts_in_the_same_pod(
    fleet: Fleet, control_plane: ControlPlane
) -> None:
    pod = fleet.pods(2)[0]
    name, uid = pod.metadata.name, pod.metadata.uid
    pid = fleet.node.container_pid(fleet.namespace, name)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)

    def restarted() -> Any:
        now = fleet.core.read_namespaced_pod(name, fleet.namespace)
        status = now.status.container_statuses[0]
        return status.restart_count == 1 and status.ready and now

    again = wait_until(restarted, timeout=30, what="the container restarted and Ready")
    assert again.metadata.uid == uid
    last = again.status.container_statuses[0].last_state.terminated
    assert last.exit_code == 137 and last.signal == signal.SIGKILL
    new_pid = fleet.node.container_pid(fleet.namespace, name)
    assert new_pid is not None and new_pid != pid
    assert "restarting worker" in fleet.node.log(fleet.namespace, name)
    # kubectl logs, through the API server to the node's log endpoint: this run, and
    # with --previous the one that was killed.
    current = control_plane.kubectl("-n", fleet.namespace, "logs", name).stdout
    previous = control_plane.kubectl("-n", fleet.namespace, "logs", name, "--previous").stdout
    assert "worker started" in current and "worker started" in previous
    assert "---- localnode:" not in current + previous  # the start markers are ours


def test_deletes_leave_nothing_terminating_and_no_process(
    fleet: Fleet, control_plane: ControlPlane
) -> None:
    first, second = fleet.pods(2)
    pid_first = fleet.node.container_pid(fleet.namespace, first.metadata.name)
    pid_second = fleet.node.container_pid(fleet.namespace, second.metadata.name)
    assert pid_first and pid_second

    started = time.monotonic()
    control_plane.kubectl(
        "-n", fleet.namespace, "delete", "pod", first.metadata.name, "--grace-period=0", "--force"
    )
    wait_dead(pid_first, timeout=5)  # SIGTERM, SIGKILL after at most 2 s
    force_s = time.monotonic() - started

    # A normal delete: the worker drains on SIGTERM and exits; the node removes the pod.
    control_plane.kubectl(
        "-n", fleet.namespace, "delete", "pod", second.metadata.name, "--wait=false"
    )
    wait_gone(fleet.core, fleet.namespace, second.metadata.name, second.metadata.uid, 30)
    wait_dead(pid_second, timeout=5)

    assert force_s < 5
    assert terminating_pods(fleet.core, fleet.namespace) == []
    # The ReplicaSet's replacements run.
    replacements = fleet.pods(2)
    assert not {p.metadata.uid for p in replacements} & {first.metadata.uid, second.metadata.uid}


def test_liveness_failure_restarts_the_process(
    api: Any, namespace: str, local_node: LocalNode, localnode_pg: ThrowawayPostgres
) -> None:
    dsn = migrated_database(localnode_pg)
    deployment = worker_deployment(
        "sick", FLOW, ENTRYPOINT, "queue-db", 1, node=local_node, worker_args=WORKER_ARGS
    )
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["livenessProbe"] = {
        "httpGet": {"path": "/no-such-path", "port": "http"},
        "periodSeconds": 1,
        "failureThreshold": 2,
    }
    apply(api, namespace, dsn_secret("queue-db", dsn), deployment)
    core = client.CoreV1Api(api)

    def restarted() -> Any:
        pods = core.list_namespaced_pod(namespace, label_selector="app=sick").items
        statuses = [p.status.container_statuses for p in pods if p.status.container_statuses]
        return statuses and statuses[0][0].restart_count >= 1

    wait_until(restarted, timeout=40, what="a restart after liveness failures")
    reasons = {e.reason for e in core.list_namespaced_event(namespace).items}
    assert {"Unhealthy", "Killing", "Started"} <= reasons
    client.AppsV1Api(api).delete_namespaced_deployment("sick", namespace)


def test_stopping_the_agent_leaves_no_process(
    api: Any,
    namespace: str,
    control_plane: ControlPlane,
    localnode_pg: ThrowawayPostgres,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    node = start_local_node(control_plane, tmp_path_factory.mktemp("node-b"), "localnode-b")
    try:
        dsn = migrated_database(localnode_pg)
        apply(
            api,
            namespace,
            dsn_secret("queue-db", dsn),
            worker_deployment(
                "workers", FLOW, ENTRYPOINT, "queue-db", 2, node=node, worker_args=WORKER_ARGS
            ),
        )
        core = client.CoreV1Api(api)
        pods = wait_pods(core, namespace, SELECTOR, 2)
        pids = [node.container_pid(namespace, p.metadata.name) for p in pods]
        assert all(pids) and len(node.processes()) >= 2
    finally:
        stop_local_node(node)  # asserts that no process is left
    for pid in pids:
        assert pid is not None
        wait_dead(pid, timeout=1)
    # The node said goodbye: no Node, and none of its pods is left Terminating.
    names = {n.metadata.name for n in core.list_node().items}
    assert node.name not in names
    assert terminating_pods(core, namespace) == []
    for pod in pods:
        wait_gone(core, namespace, pod.metadata.name, pod.metadata.uid, timeout=10)


WHOAMI = (
    "from kubernetes import client, config; config.load_kube_config(); "
    "print(client.AuthenticationV1Api().create_self_subject_review("
    "{'apiVersion': 'authentication.k8s.io/v1', 'kind': 'SelfSubjectReview'})"
    ".status.user_info.username)"
)


def test_pod_talks_to_the_api_as_its_service_account_and_completes(
    api: Any, namespace: str, local_node: LocalNode
) -> None:
    """A pod that mounts its token (as an operator pod does) reaches the API server as
    its own service account; restartPolicy Never ends Succeeded, not restarted."""
    core = client.CoreV1Api(api)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "whoami"},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": {"kubernetes.io/hostname": local_node.name},
            "containers": [
                {"name": "main", "image": "python", "command": ["python", "-c", WHOAMI]}
            ],
        },
    }
    apply(api, namespace, pod)
    done = wait_until(
        lambda: (
            (p := core.read_namespaced_pod("whoami", namespace)).status.phase == "Succeeded" and p
        ),
        timeout=60,
        what="the pod Succeeded",
    )
    status = done.status.container_statuses[0]
    assert status.restart_count == 0 and status.state.terminated.exit_code == 0
    log = local_node.log(namespace, "whoami", "main")
    assert f"system:serviceaccount:{namespace}:default" in log


DEMO_PROCESSOR = "demo_processors:survey_with_effect"  # hack/: one effect row per completion


def effect_counts(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return dict(
            conn.execute("SELECT record_key, count(*) FROM demo_effects GROUP BY record_key")
        )


def slow_fleet(
    api: Any, namespace: str, node: LocalNode, dsn: str, replicas: int, work_s: float, *args: str
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE demo_effects (record_key text NOT NULL)")
    env = (
        # Pods are local processes: the demo's processor comes from hack/.
        {"name": "PYTHONPATH", "value": str(REPO / "hack")},
        {"name": "DEMO_WORK_SECONDS", "value": str(work_s)},
    )
    apply(
        api,
        namespace,
        dsn_secret("queue-db", dsn),
        worker_deployment(
            "workers",
            FLOW,
            DEMO_PROCESSOR,
            "queue-db",
            replicas,
            node=node,
            worker_args=(*WORKER_ARGS, *args),
            env=env,
            grace_seconds=5,
        ),
    )


def test_worker_killed_mid_batch_restarts_and_its_records_complete_once(
    api: Any, namespace: str, local_node: LocalNode, localnode_pg: ThrowawayPostgres
) -> None:
    dsn = migrated_database(localnode_pg)
    slow_fleet(api, namespace, local_node, dsn, 1, 0.2, "--lease-seconds", "3")
    core = client.CoreV1Api(api)
    (pod,) = wait_pods(core, namespace, SELECTOR, 1)
    name = pod.metadata.name
    records = 40
    with psycopg.connect(dsn, autocommit=True) as conn:
        queue.enqueue(conn, FLOW, [{"n": n} for n in range(records)])

        def held() -> set[int]:
            return {
                row[0]
                for row in conn.execute(
                    "SELECT id FROM processing_queue WHERE status = 'processing'"
                    " AND flow_instance_id = %s",
                    (name,),
                )
            }

        claimed = wait_until(held, timeout=30, what="records claimed by the pod")
        local_node.kill_container(namespace, name)
        killed = time.monotonic()
        wait_until(
            lambda: not (held() & claimed) or None, timeout=30, what="the dead claims released"
        )
        released_s = time.monotonic() - killed
        wait_until(
            lambda: conn.execute("SELECT count(*) FROM processing_queue").fetchone() == (0,),
            timeout=60,
            what="the queue drained",
        )
        abandoned = conn.execute(
            "SELECT count(*) FROM processing_history WHERE abandoned_count > 0"
        ).fetchone()
    status = core.read_namespaced_pod(name, namespace).status.container_statuses[0]
    assert status.restart_count == 1  # the same pod, restarted by the node
    assert effect_counts(dsn) == {str(n): 1 for n in range(records)}
    assert abandoned is not None and abandoned[0] >= 1
    # The restarted worker has the same instance id; the dead process's claims come back
    # when their lease (3 s here) runs out and a sweep returns them.
    assert released_s < 3 * 3 + 2, released_s


def test_postgres_restart_mid_drain_workers_reconnect(
    api: Any, namespace: str, local_node: LocalNode
) -> None:
    records = 300
    with ThrowawayPostgres() as server:
        dsn = migrated_database(server)
        # The record whose transaction the restart cuts stays claimed until its lease
        # runs out (30 s by default), then completes: a short lease keeps the test short.
        slow_fleet(api, namespace, local_node, dsn, 2, 0.01, "--lease-seconds", "3")
        core = client.CoreV1Api(api)
        pods = wait_pods(core, namespace, SELECTOR, 2)
        with psycopg.connect(dsn, autocommit=True) as conn:
            queue.enqueue(conn, FLOW, [{"n": n} for n in range(records)])
            wait_until(
                lambda: conn.execute("SELECT count(*) FROM demo_effects").fetchone()[0] >= 30,
                timeout=30,
                what="the drain under way",
            )
        restart_postgres(server)
        with psycopg.connect(dsn, autocommit=True) as conn:
            wait_until(
                lambda: conn.execute("SELECT count(*) FROM processing_queue").fetchone() == (0,),
                timeout=30,
                what="the queue drained after the restart",
            )
        assert effect_counts(dsn) == {str(n): 1 for n in range(records)}
        for pod in pods:  # rode it out: no pod restarted, none replaced
            now = core.read_namespaced_pod(pod.metadata.name, namespace)
            assert now.metadata.uid == pod.metadata.uid
            assert now.status.container_statuses[0].restart_count == 0
        client.AppsV1Api(api).patch_namespaced_deployment_scale(
            "workers", namespace, {"spec": {"replicas": 0}}
        )
        wait_until(
            lambda: not core.list_namespaced_pod(namespace, label_selector=SELECTOR).items,
            timeout=60,
            what="pods gone before PostgreSQL stops",
        )


def test_a_killed_agent_takes_its_processes_along_and_a_new_one_takes_over(
    api: Any,
    namespace: str,
    control_plane: ControlPlane,
    localnode_pg: ThrowawayPostgres,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """kill -9 of the agent: the kernel ends its processes (parent-death signal); the
    Node and pods stay in the API, and the next agent of that name takes them over,
    restarting their processes as a restarted kubelet does."""
    state = tmp_path_factory.mktemp("node-c")
    node = start_local_node(control_plane, state, "localnode-c")
    core = client.CoreV1Api(api)
    try:
        dsn = migrated_database(localnode_pg)
        apply(
            api,
            namespace,
            dsn_secret("queue-db", dsn),
            worker_deployment(
                "workers", FLOW, ENTRYPOINT, "queue-db", 1, node=node, worker_args=WORKER_ARGS
            ),
        )
        (pod,) = wait_pods(core, namespace, SELECTOR, 1)
        pid = node.container_pid(namespace, pod.metadata.name)
        agent = node.agent_pid
        assert pid and agent
        os.kill(agent, signal.SIGKILL)
        wait_dead(agent, timeout=5)
        wait_dead(pid, timeout=2)
        assert node.processes() == []
        assert node.name in {n.metadata.name for n in core.list_node().items}

        node = start_local_node(control_plane, state, "localnode-c")

        def restarted() -> Any:
            now = core.read_namespaced_pod(pod.metadata.name, namespace)
            status = now.status.container_statuses[0]
            return status.restart_count == 1 and status.ready and now

        again = wait_until(restarted, timeout=30, what="the pod taken over and restarted")
        assert again.metadata.uid == pod.metadata.uid
    finally:
        stop_local_node(node)


def test_the_shipped_kubernetes_example_runs_on_the_node(
    api: Any,
    namespace: str,
    control_plane: ControlPlane,
    local_node: LocalNode,
    localnode_pg: ThrowawayPostgres,
) -> None:
    """examples/kubernetes/worker.yaml as a user applies it: each pod's init container
    migrates an empty database (with --wait), then its workers drain a burst."""
    with psycopg.connect(localnode_pg.dsn(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE shipped_example")  # no schema: the init containers make it
    dsn = localnode_pg.dsn("shipped_example")
    core = client.CoreV1Api(api)
    core.create_namespaced_secret(
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="rpa-db-secret"),
            string_data={"connection-string": dsn},
        ),
    )
    example = REPO / "examples" / "kubernetes" / "worker.yaml"
    control_plane.kubectl("-n", namespace, "apply", "-f", str(example))
    selector = "flowfleet.io/flow=survey_processor"
    pods = wait_pods(core, namespace, selector, 3, timeout=90)
    for pod in pods:
        (init,) = pod.status.init_container_statuses
        assert init.name == "migrate" and init.state.terminated.exit_code == 0
        assert {c.type: c.status for c in pod.status.conditions}["Initialized"] == "True"
    with psycopg.connect(dsn, autocommit=True) as conn:
        queue.enqueue(conn, FLOW, [{"survey_id": n} for n in range(150)])
        wait_until(
            lambda: conn.execute("SELECT count(*) FROM processing_queue").fetchone() == (0,),
            timeout=60,
            what="the example's workers drained the burst",
        )
        instances = {r[0] for r in conn.execute("SELECT flow_instance_id FROM processing_history")}
        done = conn.execute("SELECT count(*) FROM processing_history").fetchone()
    assert done == (150,)
    assert instances <= {p.metadata.name for p in pods}
    client.AppsV1Api(api).delete_namespaced_deployment("survey-processor", namespace)
    wait_until(
        lambda: not core.list_namespaced_pod(namespace, label_selector=selector).items,
        timeout=60,
        what="the example's pods gone",
    )

"""The whole loop: the real operator (`flowfleet operator` under the chart's ServiceAccount
token), the local node running its worker pods as real processes, and a real PostgreSQL
that checks passwords. One operator per module (flowfleet_operator), one node and one
server per session, one namespace and one database per test.

The pods run hack/demo_processors.py:loop_effect, which writes one ``loop_effects`` row per
execution in the transaction that completes the record: rows per key is the number of
times a record was executed, and a fenced-off late completion leaves none.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from flowfleet import queue
from flowfleet.throwaway import ThrowawayPrefect

from .conftest import REPO, ControlPlane, wait_until
from .localnode_fixtures import LocalNode
from .operator_fixtures import (
    GROUP,
    PLURAL,
    VERSION,
    OperatorProcess,
    PasswordPostgres,
    make_secret,
)

__all__ = ["loop", "loop_prefect"]

FLOW = "survey_processor"
SELECTOR_KEY = "app.kubernetes.io/instance"
LOOP_EFFECTS_DDL = (
    "CREATE TABLE IF NOT EXISTS loop_effects (k text NOT NULL, pod text NOT NULL,"
    " at timestamptz NOT NULL DEFAULT clock_timestamp())"
)


@dataclass
class Loop:
    cp: ControlPlane
    api: Any
    namespace: str
    pg: PasswordPostgres
    dbname: str
    op: OperatorProcess
    node: LocalNode

    @property
    def dsn(self) -> str:
        return self.pg.dsn(self.dbname)

    def conn(self) -> psycopg.Connection:
        return psycopg.connect(self.dsn, autocommit=True)

    @property
    def core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api)

    @property
    def apps(self) -> Any:
        from kubernetes import client

        return client.AppsV1Api(self.api)

    @property
    def objs(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self.api)

    def kubectl(self, *args: str) -> str:
        return self.cp.kubectl("-n", self.namespace, *args).stdout

    # ------------------------------------------------------------- the flow ----

    def apply_flow(self, name: str = "survey", **overrides: Any) -> None:
        spec: dict[str, Any] = {
            "flowName": FLOW,
            "image": "flowfleet:dev",
            "entrypoint": "demo_processors:loop_effect",
            "runner": "plain",
            "database": {"secretRef": {"name": "queue-db"}},
            "minReplicas": 0,
            "maxReplicas": 3,
            "recordsPerReplica": 10,
            "batchSize": 2,
            "pollIntervalSeconds": 1,
            "scaleDownDelaySeconds": 2,
            # Long: every release the tests see must come from the loop, not the lease.
            "leaseSeconds": 60,
            "gracePeriodSeconds": 20,
            # Pods are local processes here: the processor comes from hack/.
            "env": [
                {"name": "PYTHONPATH", "value": str(REPO / "hack")},
                {"name": "DEMO_WORK_SECONDS", "value": "0.05"},
            ],
            **overrides,
        }
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "DistributedFlow",
            "metadata": {"name": name},
            "spec": spec,
        }
        self.objs.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)
        # Records can only be enqueued once the operator has migrated the database.
        wait_until(
            lambda: self.flow_status(name).get("schemaVersion"),
            timeout=30,
            what=f"{name} migrated by the operator",
        )

    def flow_status(self, name: str = "survey") -> dict[str, Any]:
        found = self.objs.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        return dict(found.get("status") or {})

    def enqueue(self, payloads: list[dict[str, Any]]) -> None:
        with self.conn() as conn:
            queue.enqueue(conn, FLOW, payloads)

    # ----------------------------------------------------------------- pods ----

    def pods(self, name: str = "survey", live: bool = True) -> list[Any]:
        found = self.core.list_namespaced_pod(
            self.namespace, label_selector=f"{SELECTOR_KEY}={name}"
        ).items
        if live:
            found = [p for p in found if p.metadata.deletion_timestamp is None]
        return sorted(found, key=lambda p: p.metadata.name)

    def running_pods(self, name: str = "survey") -> list[Any]:
        return [p for p in self.pods(name) if p.status.phase == "Running"]

    def wait_running(self, n: int, name: str = "survey", timeout: float = 60) -> list[Any]:
        return list(
            wait_until(
                lambda: (len(p := self.running_pods(name)) >= n) and p,
                timeout=timeout,
                interval=0.2,
                what=f"{n} Running worker pods",
            )
        )

    def wait_no_pods(self, name: str = "survey", timeout: float = 60) -> None:
        wait_until(
            lambda: not self.pods(name, live=False),
            timeout=timeout,
            interval=0.2,
            what="no worker pods left",
        )

    def deployment_replicas(self, name: str = "survey") -> int | None:
        from kubernetes.client.rest import ApiException

        try:
            return int(self.apps.read_namespaced_deployment(name, self.namespace).spec.replicas)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def describe(self, name: str = "survey") -> str:
        """What a person would look at when a scenario hangs: events, pods, the queue."""
        events = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={name}"
        ).items
        lines = [f"{e.reason}: {e.message}" for e in events]
        for p in self.pods(name, live=False):
            terminating = " (terminating)" if p.metadata.deletion_timestamp else ""
            cost = (p.metadata.annotations or {}).get("controller.kubernetes.io/pod-deletion-cost")
            lines.append(f"pod {p.metadata.name} {p.status.phase}{terminating} cost={cost}")
        lines.append(f"queue {self.counts()}; replicas {self.deployment_replicas(name)}")
        return "\n".join(lines)

    # ---------------------------------------------------------------- queue ----

    def counts(self) -> dict[str, int]:
        """pending, processing, completed, failed (the queue's own stats)."""
        with self.conn() as conn:
            stats = queue.stats(conn, FLOW).get(FLOW, {})
        return {
            key: int(stats.get(f"{key}_records", 0))
            for key in ("pending", "processing", "completed", "failed")
        }

    def claims(self, pod: str) -> dict[int, int]:
        """The records a pod holds: id -> claim token."""
        with self.conn() as conn:
            rows = conn.execute(
                "SELECT id, claim_token FROM processing_queue WHERE flow_instance_id = %s"
                " AND status = 'processing'",
                (pod,),
            ).fetchall()
        return {int(r[0]): int(r[1]) for r in rows}

    def executions(self) -> dict[str, int]:
        """Executions per record key (committed ones)."""
        with self.conn() as conn:
            rows = conn.execute("SELECT k, count(*) FROM loop_effects GROUP BY k").fetchall()
        return {str(k): int(n) for k, n in rows}

    def wait_drained(self, total: int, timeout: float = 90) -> None:
        wait_until(
            lambda: self.counts()["completed"] == total,
            timeout=timeout,
            interval=0.3,
            what=f"{total} records completed (now {self.counts()})",
        )

    def assert_exactly_once(self, keys: list[str]) -> None:
        """Every record completed, executed exactly once, nothing left processing."""
        counts = self.counts()
        assert counts == {"pending": 0, "processing": 0, "completed": len(keys), "failed": 0}
        executions = self.executions()
        assert set(executions) == set(keys), "lost or unknown records"
        twice = {k: n for k, n in executions.items() if n != 1}
        assert not twice, f"executed more than once: {twice}"


@pytest.fixture
def loop(
    control_plane: ControlPlane,
    api: Any,
    namespace: str,
    password_postgres: PasswordPostgres,
    flowfleet_operator: OperatorProcess,
    local_node: LocalNode,
) -> Iterator[Loop]:
    dbname = password_postgres.new_database()
    lp = Loop(
        control_plane, api, namespace, password_postgres, dbname, flowfleet_operator, local_node
    )
    with lp.conn() as conn:
        conn.execute(LOOP_EFFECTS_DDL)
    make_secret(api, namespace, "queue-db", {"connection-string": lp.dsn})
    yield lp


@pytest.fixture(scope="module")
def loop_prefect() -> Iterator[ThrowawayPrefect]:
    """A real Prefect server; the test process reads it through the Prefect client."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    with ThrowawayPrefect() as server:
        updates = {PREFECT_API_URL: server.url, PREFECT_HOME: server.client_home}
        with temporary_settings(updates=updates):
            yield server
            server.drain_client()

"""The operator end to end: `flowfleet operator` (under the Helm chart's ServiceAccount)
against the real control plane and a real PostgreSQL that checks passwords. Worker pods are
never scheduled here: the tests play the workers through the queue API, under the pod
names the ReplicaSet gave.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from flowfleet import queue
from flowfleet.sql import latest_version

from .conftest import REPO, ControlPlane, wait_until
from .operator_fixtures import (
    APP_PASSWORD,
    GROUP,
    PLURAL,
    VERSION,
    OperatorProcess,
    PasswordPostgres,
    make_secret,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

FLOW = "survey_processor"
SPEC: dict[str, Any] = {
    "flowName": FLOW,
    "image": "flowfleet:dev",
    "entrypoint": "flowfleet.examples:survey_processor",
    "runner": "plain",
    "database": {"secretRef": {"name": "queue-db"}},
    "recordsPerReplica": 100,
    "pollIntervalSeconds": 1,
    "scaleDownDelaySeconds": 3,
    # These tests play the workers themselves: their pods must stay Pending even when the
    # session has a local node that would run them (tests/e2e/localnode_fixtures.py).
    "nodeSelector": {"flowfleet.io/e2e-unschedulable": "true"},
}


@dataclass
class Env:
    cp: ControlPlane
    api: Any
    namespace: str
    pg: PasswordPostgres
    dbname: str
    op: OperatorProcess

    @property
    def dsn(self) -> str:
        return self.pg.dsn(self.dbname)

    def conn(self) -> psycopg.Connection:
        conn = psycopg.connect(self.dsn, autocommit=True)
        conn.execute("SET TIME ZONE 'UTC'")
        return conn

    def objs(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self.api)

    def apps(self) -> Any:
        from kubernetes import client

        return client.AppsV1Api(self.api)

    def core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api)

    def apply_flow(self, name: str, **overrides: Any) -> None:
        spec = {**copy.deepcopy(SPEC), **overrides}
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "DistributedFlow",
            "metadata": {"name": name},
            "spec": spec,
        }
        self.objs().create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)

    def flow(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self.objs().get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name
        )
        return found

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        for c in self.flow(name).get("status", {}).get("conditions", []):
            if c["type"] == type_:
                return dict(c)
        return {}

    def deployment_replicas(self, name: str) -> int | None:
        from kubernetes.client.rest import ApiException

        try:
            return int(self.apps().read_namespaced_deployment(name, self.namespace).spec.replicas)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def wait_replicas(self, name: str, n: int, timeout: float = 30) -> None:
        wait_until(
            lambda: self.deployment_replicas(name) == n,
            timeout=timeout,
            interval=0.1,
            what=f"Deployment {name} at {n} replicas (now {self.deployment_replicas(name)})",
        )

    def wait_condition(
        self, name: str, type_: str, status: str, timeout: float = 30
    ) -> dict[str, Any]:
        return dict(
            wait_until(
                lambda: (c := self.condition(name, type_)).get("status") == status and c,
                timeout=timeout,
                what=f"{type_}={status} on {name}",
            )
        )

    def events(self, name: str) -> list[dict[str, Any]]:
        found = self.core().list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={name}"
        )
        return [{"type": e.type, "reason": e.reason, "message": e.message} for e in found.items]

    def kubectl(self, *args: str) -> str:
        return self.cp.kubectl("-n", self.namespace, *args).stdout


@pytest.fixture
def env(
    control_plane: ControlPlane,
    api: Any,
    namespace: str,
    password_postgres: PasswordPostgres,
    flowfleet_operator: OperatorProcess,
) -> Iterator[Env]:
    dbname = password_postgres.new_database()
    e = Env(control_plane, api, namespace, password_postgres, dbname, flowfleet_operator)
    make_secret(api, namespace, "queue-db", {"connection-string": e.dsn})
    yield e


def drain(conn: psycopg.Connection, instance: str = "e2e-tester") -> int:
    """Complete every ready record through the queue API, as a worker would."""
    done = 0
    while batch := queue.claim(conn, FLOW, instance, 200, 60):
        done += len(queue.complete(conn, batch, [None] * len(batch)))
    return done


def test_apply_migrates_deploys_and_sets_conditions(env: Env) -> None:
    env.apply_flow("survey")
    env.wait_condition("survey", "Ready", "True")
    env.wait_condition("survey", "Active", "False")  # after the first depth read
    status = env.flow("survey")["status"]
    assert status["schemaVersion"] == latest_version()
    assert status["selector"] == (
        "app.kubernetes.io/name=flowfleet,app.kubernetes.io/instance=survey,"
        "app.kubernetes.io/component=worker"
    )
    types = {c["type"]: c["status"] for c in status["conditions"]}
    assert types == {
        "Ready": "True",
        "DatabaseReachable": "True",
        "SchemaReady": "True",
        "Active": "False",
        "ScalingLimited": "False",
    }
    with env.conn() as conn:
        assert conn.execute("SELECT max(version) FROM flowfleet_migrations").fetchone() == (
            latest_version(),
        )
    d = env.apps().read_namespaced_deployment("survey", env.namespace)
    assert d.spec.replicas == 0
    (owner,) = d.metadata.owner_references
    assert (owner.kind, owner.name, owner.controller) == ("DistributedFlow", "survey", True)
    assert d.metadata.labels["app.kubernetes.io/instance"] == "survey"
    assert d.metadata.labels["flowfleet.io/flow"] == FLOW
    (c,) = d.spec.template.spec.containers
    assert c.args[:4] == ["worker", FLOW, "--entrypoint", "flowfleet.examples:survey_processor"]
    dsn_env = next(e for e in c.env if e.name == "FLOWFLEET_DSN")
    assert dsn_env.value is None and dsn_env.value_from.secret_key_ref.name == "queue-db"
    assert c.liveness_probe.http_get.path == "/healthz"
    assert d.spec.template.spec.security_context.run_as_non_root is True
    reasons = {e["reason"] for e in env.events("survey")}
    assert {"Migrated", "DeploymentCreated"} <= reasons


def test_scales_to_the_queue_and_back_after_the_delay(env: Env) -> None:
    env.apply_flow("survey")
    env.wait_condition("survey", "Ready", "True")
    with env.conn() as conn:
        queue.enqueue(conn, FLOW, [{"n": i} for i in range(480)])
    env.wait_replicas("survey", 5, timeout=10)
    wait_until(
        lambda: env.flow("survey")["status"].get("pendingRecords") == 480,
        timeout=10,
        what="pendingRecords 480",
    )
    table = env.kubectl("get", "dflow", "survey")
    header, row = table.strip().splitlines()
    assert header.split()[:7] == [
        "NAME",
        "FLOW",
        "PENDING",
        "PROCESSING",
        "FAILED",
        "REPLICAS",
        "DESIRED",
    ]
    assert row.split()[:3] == ["survey", FLOW, "480"]
    assert row.split()[6] == "5"
    assert "RATE/MIN" in env.kubectl("get", "dflow", "survey", "-o", "wide")
    assert {
        "type": "Normal",
        "reason": "ScaledUp",
        "message": "0 -> 5: 480 ready, 100 per replica",
    } in env.events("survey")
    with env.conn() as conn:
        assert drain(conn) == 480
    # Held for scaleDownDelaySeconds (3 s), then to minReplicas.
    started = time.monotonic()
    env.wait_replicas("survey", 0, timeout=20)
    assert time.monotonic() - started >= 2.0
    status = wait_until(
        lambda: (s := env.flow("survey")["status"])["desiredReplicas"] == 0 and s,
        timeout=5,
        what="status.desiredReplicas 0",
    )
    assert status["pendingRecords"] == 0
    assert status["recordsPerMinute"] > 0
    metrics = env.op.metrics()
    labels = f'name="survey",namespace="{env.namespace}"'
    assert f"flowfleet_operator_desired_replicas{{{labels}}} 0.0" in metrics
    assert f'flowfleet_operator_scale_events_total{{direction="up",{labels}}} 1.0' in metrics
    assert APP_PASSWORD not in metrics
    env.wait_condition("survey", "Active", "False", timeout=5)


def test_scale_pins_and_removing_replicas_resumes_autoscaling(env: Env) -> None:
    env.apply_flow("survey")
    env.wait_condition("survey", "Ready", "True")
    env.kubectl("scale", "dflow/survey", "--replicas=2")
    env.wait_replicas("survey", 2, timeout=10)
    limited = env.wait_condition("survey", "ScalingLimited", "True")
    assert limited["reason"] == "Pinned"
    # The scale subresource reads back what kubectl set.
    scale = env.objs().get_namespaced_custom_object_scale(
        GROUP, VERSION, env.namespace, PLURAL, "survey"
    )
    assert scale["spec"]["replicas"] == 2
    env.kubectl(
        "patch", "dflow/survey", "--type=json", "-p", '[{"op":"remove","path":"/spec/replicas"}]'
    )
    env.wait_condition("survey", "ScalingLimited", "False")
    env.wait_replicas("survey", 0, timeout=20)


def test_invalid_specs_are_rejected_naming_the_field(env: Env, operator_crd: None) -> None:
    cases = {
        "spec.batchSize": {"batchSize": 0},
        "spec.minReplicas must not exceed spec.maxReplicas": {"minReplicas": 5, "maxReplicas": 2},
        "spec.podLabels": {"podLabels": {"flowfleet.io/flow": "other"}},
        "spec.sourceDatabases[0].name": {
            "sourceDatabases": [{"name": "1bad", "secretRef": {"name": "s"}}]
        },
        "spec.imagePullPolicy": {"imagePullPolicy": "Sometimes"},
        "spec.targetDrainSeconds": {"targetDrainSeconds": 0},
        "spec.prefect.apiUrl": {"prefect": {"apiUrl": "not a url"}},
    }
    from kubernetes.client.rest import ApiException

    for i, (field, bad) in enumerate(cases.items()):
        with pytest.raises(ApiException) as err:
            env.apply_flow(f"bad-{i}", **bad)
        assert err.value.status == 422
        assert field in json.loads(err.value.body)["message"], (field, err.value.body)


def no_password_anywhere(env: Env, name: str, password: str) -> None:
    assert password not in json.dumps(env.flow(name).get("status", {}))
    assert password not in json.dumps(env.events(name))
    log = env.op.log()
    assert password not in log
    # JSON lines, every one of them.
    assert all(json.loads(line)["msg"] is not None for line in log.splitlines() if line)


def test_wrong_password_then_rotation_without_restart(env: Env) -> None:
    wrong = "Wrong-" + uuid.uuid4().hex[:10]
    make_secret(
        env.api, env.namespace, "wrong-db", {"connection-string": env.pg.dsn(env.dbname, wrong)}
    )
    env.apply_flow("wrong", database={"secretRef": {"name": "wrong-db"}})
    cond = env.wait_condition("wrong", "DatabaseReachable", "False")
    assert cond["reason"] == "AuthenticationFailed"
    assert "password authentication failed" in cond["message"]
    assert env.condition("wrong", "Ready")["status"] == "False"
    assert env.deployment_replicas("wrong") is None
    assert any(
        e["type"] == "Warning" and e["reason"] == "AuthenticationFailed"
        for e in env.events("wrong")
    )
    no_password_anywhere(env, "wrong", wrong)
    no_password_anywhere(env, "wrong", APP_PASSWORD)
    # Fix the Secret: it takes effect without restarting the operator.
    env.core().patch_namespaced_secret(
        "wrong-db", env.namespace, {"stringData": {"connection-string": env.dsn}}
    )
    env.wait_condition("wrong", "Ready", "True", timeout=30)
    assert env.deployment_replicas("wrong") == 0
    no_password_anywhere(env, "wrong", APP_PASSWORD)


def test_missing_secret_names_secret_and_key(env: Env) -> None:
    env.apply_flow("nosecret", database={"secretRef": {"name": "later-db", "key": "dsn"}})
    cond = env.wait_condition("nosecret", "DatabaseReachable", "False")
    assert cond["reason"] == "SecretNotFound"
    assert "later-db" in cond["message"] and "'dsn'" in cond["message"]
    assert any(e["reason"] == "SecretNotFound" for e in env.events("nosecret"))
    make_secret(env.api, env.namespace, "later-db", {"dsn": env.dsn})
    env.wait_condition("nosecret", "Ready", "True", timeout=30)
    # Gone again after the flow was deployed: said so within a poll interval or two.
    env.core().delete_namespaced_secret("later-db", env.namespace)
    try:
        cond = env.wait_condition("nosecret", "DatabaseReachable", "False", timeout=10)
    except AssertionError:
        print("healthy:", env.op.healthy(), env.op.log()[-5000:])
        raise
    assert cond["reason"] == "SecretNotFound"
    time.sleep(2.5)  # and it stays said: a working old connection does not flip it back
    assert env.condition("nosecret", "DatabaseReachable")["reason"] == "SecretNotFound"
    no_password_anywhere(env, "nosecret", APP_PASSWORD)


def test_prefect_runner_without_api_url_gets_no_deployment(env: Env) -> None:
    env.apply_flow("noapi", runner="prefect")
    ready = env.wait_condition("noapi", "Ready", "False")
    assert ready["reason"] == "PrefectApiUrlMissing"
    assert any(
        e["type"] == "Warning" and e["reason"] == "PrefectApiUrlMissing"
        for e in env.events("noapi")
    )
    time.sleep(1)
    assert env.deployment_replicas("noapi") is None
    env.objs().patch_namespaced_custom_object(
        GROUP,
        VERSION,
        env.namespace,
        PLURAL,
        "noapi",
        {"spec": {"prefect": {"apiUrl": "http://prefect.example:4200/api"}}},
    )
    env.wait_condition("noapi", "Ready", "True")
    d = env.apps().read_namespaced_deployment("noapi", env.namespace)
    (c,) = d.spec.template.spec.containers
    assert {"PREFECT_API_URL": "http://prefect.example:4200/api"}.items() <= {
        e.name: e.value for e in c.env
    }.items()


def worker_pods(env: Env, name: str) -> list[str]:
    pods = env.core().list_namespaced_pod(
        env.namespace, label_selector=f"app.kubernetes.io/instance={name}"
    )
    return sorted(p.metadata.name for p in pods.items if p.metadata.deletion_timestamp is None)


def test_deleted_pod_claims_back_to_pending_within_2s(env: Env) -> None:
    env.apply_flow("survey", replicas=2)
    env.wait_replicas("survey", 2)
    pods = wait_until(
        lambda: (p := worker_pods(env, "survey")) and len(p) == 2 and p, what="2 pods"
    )
    with env.conn() as conn:
        queue.enqueue(conn, FLOW, [{"n": i} for i in range(30)])
        held = queue.claim(conn, FLOW, pods[0], 10, 300)
        other = queue.claim(conn, FLOW, pods[1], 10, 300)
        assert len(held) == len(other) == 10
        env.core().delete_namespaced_pod(pods[0], env.namespace)
        deleted = time.monotonic()

        def released() -> bool:
            rows = conn.execute(
                "SELECT status, abandoned_count, flow_instance_id FROM processing_queue"
                " WHERE id = ANY(%s)",
                [[r.id for r in held]],
            ).fetchall()
            return all(r == ("pending", 1, None) for r in rows)

        wait_until(released, timeout=2, interval=0.05, what="claims of the deleted pod pending")
        assert time.monotonic() - deleted < 2
        # The live pod's claims are untouched.
        still = conn.execute(
            "SELECT count(*) FROM processing_queue"
            " WHERE flow_instance_id = %s AND status = 'processing'",
            [pods[1]],
        ).fetchone()
        assert still == (10,)
    wait_until(
        lambda: any(e["reason"] == "ClaimsReleased" for e in env.events("survey")),
        timeout=10,
        what="a ClaimsReleased event",
    )


def test_scale_in_removes_idle_pods_and_keeps_the_busy_one(env: Env) -> None:
    env.apply_flow("survey", replicas=3)
    env.wait_replicas("survey", 3)
    pods = wait_until(
        lambda: (p := worker_pods(env, "survey")) and len(p) == 3 and p, what="3 pods"
    )
    busy = pods[1]
    with env.conn() as conn:
        queue.enqueue(conn, FLOW, [{"n": i} for i in range(10)])
        assert len(queue.claim(conn, FLOW, busy, 10, 300)) == 10
    # Unpinned: 10 records in flight on one pod want 1 replica; after the delay the two
    # idle pods go (deletion cost 0) and the busy one (cost 10) stays.
    env.kubectl(
        "patch", "dflow/survey", "--type=json", "-p", '[{"op":"remove","path":"/spec/replicas"}]'
    )
    env.wait_replicas("survey", 1, timeout=20)
    costs = {
        p.metadata.name: (p.metadata.annotations or {}).get(
            "controller.kubernetes.io/pod-deletion-cost"
        )
        for p in env.core().list_namespaced_pod(env.namespace).items
    }
    assert costs[busy] == "10"
    wait_until(lambda: worker_pods(env, "survey") == [busy], timeout=20, what="only the busy pod")


def test_operator_restart_changes_nothing(env: Env) -> None:
    env.apply_flow("survey", replicas=3)
    env.wait_replicas("survey", 3)
    env.wait_condition("survey", "ScalingLimited", "True")
    time.sleep(2)  # let the status settle
    before_flow = env.flow("survey")["metadata"]["resourceVersion"]
    before = env.apps().read_namespaced_deployment("survey", env.namespace)
    env.op.restart()
    time.sleep(4)  # resume, and a few idle ticks
    deployments = env.apps().list_namespaced_deployment(env.namespace).items
    assert [d.metadata.name for d in deployments] == ["survey"]
    after = deployments[0]
    assert after.metadata.uid == before.metadata.uid
    assert after.metadata.generation == before.metadata.generation
    assert after.spec.replicas == 3
    # Resuming and idling wrote nothing to the DistributedFlow.
    assert env.flow("survey")["metadata"]["resourceVersion"] == before_flow


def test_deleting_the_flow_removes_its_deployment_and_keeps_records(env: Env) -> None:
    env.apply_flow("survey")
    env.wait_condition("survey", "Ready", "True")
    with env.conn() as conn:
        queue.enqueue(conn, FLOW, [{"n": i} for i in range(7)])
    env.wait_replicas("survey", 1)
    env.objs().delete_namespaced_custom_object(GROUP, VERSION, env.namespace, PLURAL, "survey")
    wait_until(
        lambda: env.deployment_replicas("survey") is None, timeout=60, what="Deployment gone (GC)"
    )
    with env.conn() as conn:
        assert conn.execute("SELECT count(*) FROM processing_queue").fetchone() == (7,)


def test_database_down_holds_replicas_then_recovers(env: Env) -> None:
    env.apply_flow("survey")
    env.wait_condition("survey", "Ready", "True")
    with env.conn() as conn:
        queue.enqueue(conn, FLOW, [{"n": i} for i in range(150)])
    env.wait_replicas("survey", 2)
    env.pg.stop()
    try:
        cond = env.wait_condition("survey", "DatabaseReachable", "False", timeout=20)
        assert cond["reason"] == "DatabaseUnreachable"
        time.sleep(3)  # several ticks, past scaleDownDelaySeconds: nothing scales to zero
        assert env.deployment_replicas("survey") == 2
    finally:
        env.pg.start()
    env.wait_condition("survey", "DatabaseReachable", "True", timeout=30)
    env.wait_condition("survey", "Ready", "True")
    assert env.deployment_replicas("survey") == 2


def test_survey_example_is_a_valid_distributedflow(env: Env) -> None:
    example = str(REPO / "examples" / "distributedflow-survey.yaml")
    out = env.kubectl("apply", "--dry-run=server", "-f", example)
    assert "distributedflow.flowfleet.io/survey-processor created (server dry run)" in out


def test_operator_needed_no_more_than_its_rbac(env: Env) -> None:
    """Runs last in this module: nothing the operator did so far (under the contract's
    ClusterRole) was refused by the API server."""
    env.apply_flow("survey")
    env.wait_condition("survey", "Ready", "True")
    refused = [
        line
        for line in env.op.log().splitlines()
        # Events for objects of a namespace being deleted are refused whatever the RBAC.
        if ("forbidden" in line.lower() or " 403" in line) and "being terminated" not in line
    ]
    assert refused == []

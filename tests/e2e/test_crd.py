"""The DistributedFlow CRD (crds/distributedflow.yaml) on a real API server:
schema defaults and validation, the status subresource, label selectors, watch,
printer columns."""

from __future__ import annotations

import copy
import json
import threading
from typing import Any

import pytest

from .conftest import CRD_FILE, ControlPlane, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

GROUP, VERSION, PLURAL = "flowfleet.io", "v1alpha1", "distributedflows"
CRD_NAME = f"{PLURAL}.{GROUP}"

MINIMAL_SPEC = {
    "flowName": "ingest-orders",
    "image": "ghcr.io/example/orders-worker:1.0",
    "entrypoint": "orders.flows:process_batch",
    "database": {"secretRef": {"name": "orders-db"}},
}


def dflow(
    name: str, spec: dict[str, Any] | None = None, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DistributedFlow",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": copy.deepcopy(MINIMAL_SPEC if spec is None else spec),
    }


@pytest.fixture(scope="module")
def crd(control_plane: ControlPlane) -> str:
    control_plane.kubectl("apply", "-f", str(CRD_FILE))
    control_plane.kubectl(
        "wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s", timeout=90
    )
    return CRD_NAME


@pytest.fixture
def objs(api: Any, crd: str) -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(api)


def test_server_side_dry_run_of_the_crd(control_plane: ControlPlane) -> None:
    # Run before or after `crd` (pytest order): either way the server validates it.
    out = control_plane.kubectl("apply", "--dry-run=server", "-f", str(CRD_FILE)).stdout
    assert CRD_NAME in out and "(server dry run)" in out


def test_crd_is_established_with_its_names(control_plane: ControlPlane, api: Any, crd: str) -> None:
    from kubernetes import client

    got = client.ApiextensionsV1Api(api).read_custom_resource_definition(crd)
    conditions = {c.type: c.status for c in got.status.conditions}
    assert conditions["Established"] == "True"
    assert conditions["NamesAccepted"] == "True"
    names = got.status.accepted_names
    assert (names.kind, names.plural, names.singular) == (
        "DistributedFlow",
        "distributedflows",
        "distributedflow",
    )
    assert names.short_names == ["dflow"]
    assert got.spec.scope == "Namespaced"
    # Discovery shows the short name and the status subresource.
    out = control_plane.kubectl("api-resources", f"--api-group={GROUP}", "-o", "wide").stdout
    assert "distributedflows" in out and "dflow" in out and "DistributedFlow" in out
    resources = json.loads(control_plane.kubectl("get", "--raw", f"/apis/{GROUP}/{VERSION}").stdout)
    names_served = {r["name"] for r in resources["resources"]}
    assert {"distributedflows", "distributedflows/status", "distributedflows/scale"} <= names_served


def test_create_applies_schema_defaults(objs: Any, namespace: str) -> None:
    objs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, dflow("orders"))
    spec = objs.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "orders")["spec"]
    assert spec["flowName"] == "ingest-orders"
    assert spec["runner"] == "prefect"
    assert spec["database"] == {
        "secretRef": {"name": "orders-db", "key": "connection-string"},
        "migrate": True,
    }
    assert {
        k: spec[k]
        for k in (
            "batchSize",
            "concurrency",
            "minReplicas",
            "maxReplicas",
            "recordsPerReplica",
            "scaleDownDelaySeconds",
            "pollIntervalSeconds",
            "leaseSeconds",
            "maxRetries",
        )
    } == {
        "batchSize": 50,
        "concurrency": 1,
        "minReplicas": 0,
        "maxReplicas": 10,
        "recordsPerReplica": 100,
        "scaleDownDelaySeconds": 60,
        "pollIntervalSeconds": 10,
        "leaseSeconds": 30,
        "maxRetries": 3,
    }


def test_passthrough_fields_keep_unknown_content(objs: Any, namespace: str) -> None:
    spec = {
        **MINIMAL_SPEC,
        "env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
        "resources": {"limits": {"cpu": "500m", "memory": "256Mi"}},
    }
    objs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, dflow("pt", spec))
    got = objs.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "pt")["spec"]
    assert got["env"] == spec["env"]
    assert got["resources"] == spec["resources"]


def test_patch_spec_bumps_generation(objs: Any, namespace: str) -> None:
    created = objs.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, dflow("patched")
    )
    assert created["metadata"]["generation"] == 1
    patched = objs.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "patched", {"spec": {"batchSize": 200, "maxReplicas": 4}}
    )
    assert patched["spec"]["batchSize"] == 200
    assert patched["spec"]["maxReplicas"] == 4
    assert patched["metadata"]["generation"] == 2
    got = objs.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "patched")
    assert got["spec"]["batchSize"] == 200


def test_status_only_changes_through_the_status_subresource(objs: Any, namespace: str) -> None:
    objs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, dflow("st"))
    status = {
        "pendingRecords": 1234,
        "processingRecords": 50,
        "failedRecords": 2,
        "completedRecords": 9_000_000_000,
        "replicas": 3,
        "desiredReplicas": 4,
        "readyReplicas": 3,
        "observedGeneration": 1,
        "lastScaleTime": "2025-01-02T03:04:05Z",
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "Scaled",
                "message": "3 workers",
                "lastTransitionTime": "2025-01-02T03:04:05Z",
                "observedGeneration": 1,
            }
        ],
    }
    after = objs.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "st", {"status": status}
    )
    assert after["status"] == status
    assert after["metadata"]["generation"] == 1  # status writes do not bump generation

    # Through the main resource, a status change is silently dropped...
    objs.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "st",
        {"spec": {"concurrency": 2}, "status": {"pendingRecords": 1, "replicas": 99}},
    )
    got = objs.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "st")
    assert got["spec"]["concurrency"] == 2
    assert got["status"] == status
    # ...and through /status a spec change is.
    objs.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "st",
        {"spec": {"concurrency": 7}, "status": {"pendingRecords": 0}},
    )
    got = objs.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "st")
    assert got["spec"]["concurrency"] == 2
    assert got["status"]["pendingRecords"] == 0


def test_status_is_validated(objs: Any, namespace: str) -> None:
    from kubernetes.client.rest import ApiException

    objs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, dflow("badstatus"))
    with pytest.raises(ApiException) as err:
        objs.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            "badstatus",
            {"status": {"conditions": [{"type": "Ready", "status": "Maybe"}]}},
        )
    assert err.value.status == 422
    assert "status.conditions[0].status" in err.value.body


def test_list_with_label_selector(objs: Any, namespace: str) -> None:
    for name, team in (("a1", "alpha"), ("a2", "alpha"), ("b1", "beta")):
        objs.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, dflow(name, labels={"team": team})
        )
    names = lambda sel: sorted(  # noqa: E731
        o["metadata"]["name"]
        for o in objs.list_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, label_selector=sel
        )["items"]
    )
    assert names("team=alpha") == ["a1", "a2"]
    assert names("team!=alpha") == ["b1"]
    assert names("team in (alpha,beta)") == ["a1", "a2", "b1"]
    assert names("team=gamma") == []


def test_watch_sees_added_modified_deleted(objs: Any, namespace: str) -> None:
    from kubernetes import watch

    rv = objs.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["metadata"][
        "resourceVersion"
    ]
    events: list[tuple[str, int | None]] = []
    started = threading.Event()

    def consume() -> None:
        w = watch.Watch()
        started.set()
        for ev in w.stream(
            objs.list_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            resource_version=rv,
            timeout_seconds=60,
        ):
            obj = ev["object"]
            if obj["metadata"]["name"] != "watched":
                continue
            events.append((ev["type"], obj["spec"].get("batchSize")))
            if ev["type"] == "DELETED":
                w.stop()

    watcher = threading.Thread(target=consume, daemon=True)
    watcher.start()
    started.wait(10)
    objs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, dflow("watched"))
    objs.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "watched", {"spec": {"batchSize": 77}}
    )
    objs.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "watched")
    watcher.join(70)
    assert not watcher.is_alive(), f"watch did not see DELETED; saw {events}"
    assert events == [("ADDED", 50), ("MODIFIED", 77), ("DELETED", 77)]


def test_delete(objs: Any, namespace: str) -> None:
    from kubernetes.client.rest import ApiException

    objs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, dflow("gone"))
    objs.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "gone")

    def is_gone() -> bool:
        try:
            objs.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "gone")
        except ApiException as exc:
            return exc.status == 404
        return False

    wait_until(is_gone, timeout=30, what="DistributedFlow gone to be deleted")


def test_printer_columns_in_kubectl_get(
    control_plane: ControlPlane, objs: Any, namespace: str
) -> None:
    objs.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, dflow("shown", {**MINIMAL_SPEC, "flowName": "billing"})
    )
    objs.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "shown",
        {
            "status": {
                "pendingRecords": 321,
                "processingRecords": 45,
                "failedRecords": 6,
                "replicas": 2,
                "desiredReplicas": 3,
                "conditions": [
                    {"type": "Progressing", "status": "False"},
                    {"type": "Ready", "status": "True"},
                ],
            }
        },
    )
    out = control_plane.kubectl("get", "dflow", "-n", namespace).stdout.splitlines()
    assert out[0].split() == [
        "NAME",
        "FLOW",
        "PENDING",
        "PROCESSING",
        "FAILED",
        "REPLICAS",
        "DESIRED",
        "READY",
        "AGE",
    ]
    row = out[1].split()
    assert row[:8] == ["shown", "billing", "321", "45", "6", "2", "3", "True"]
    # The full resource name resolves to the same object.
    assert (
        control_plane.kubectl(
            "get", "distributedflows.flowfleet.io", "shown", "-n", namespace, "-o", "name"
        ).stdout.strip()
        == "distributedflow.flowfleet.io/shown"
    )


INVALID = [
    pytest.param({"batchSize": 0}, "spec.batchSize", id="batchSize-0"),
    pytest.param({"batchSize": 10001}, "spec.batchSize", id="batchSize-too-big"),
    pytest.param({"flowName": None}, "spec.flowName", id="missing-flowName"),
    pytest.param({"flowName": "-starts-with-dash"}, "spec.flowName", id="bad-flowName"),
    pytest.param({"image": ""}, "spec.image", id="empty-image"),
    pytest.param(
        {"entrypoint": "orders.flows.process_batch"},
        "spec.entrypoint",
        id="entrypoint-without-colon",
    ),
    pytest.param({"entrypoint": "orders flows:run"}, "spec.entrypoint", id="entrypoint-space"),
    pytest.param({"runner": "celery"}, "spec.runner", id="unknown-runner"),
    pytest.param(
        {"database": {"secretRef": {}}}, "spec.database.secretRef.name", id="secretRef-without-name"
    ),
    pytest.param({"database": None}, "spec.database", id="missing-database"),
    pytest.param({"concurrency": 257}, "spec.concurrency", id="concurrency-too-big"),
    pytest.param({"leaseSeconds": 4}, "spec.leaseSeconds", id="lease-too-short"),
    pytest.param({"maxRetries": -1}, "spec.maxRetries", id="negative-maxRetries"),
    pytest.param(
        {"minReplicas": 5, "maxReplicas": 2},
        "spec.minReplicas must not exceed spec.maxReplicas",
        id="min-above-max",
    ),
    pytest.param(
        {"minReplicas": 11},
        "spec.minReplicas must not exceed spec.maxReplicas",
        id="min-above-default-max",
    ),
]


@pytest.mark.parametrize(("change", "expected"), INVALID)
def test_invalid_objects_are_rejected_naming_the_field(
    objs: Any, namespace: str, change: dict[str, Any], expected: str
) -> None:
    from kubernetes.client.rest import ApiException

    spec = {**MINIMAL_SPEC, **change}
    spec = {k: v for k, v in spec.items() if v is not None}
    with pytest.raises(ApiException) as err:
        objs.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, dflow("invalid", spec)
        )
    assert err.value.status == 422, err.value.body
    body = json.loads(err.value.body)
    assert body["reason"] == "Invalid"
    assert expected in body["message"], body["message"]
    assert objs.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"] == []


def test_kubectl_apply_reports_the_invalid_field(
    control_plane: ControlPlane, crd: str, namespace: str
) -> None:
    manifest = json.dumps(dflow("viakubectl", {**MINIMAL_SPEC, "batchSize": 0}))
    proc = control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=manifest, check=False)
    assert proc.returncode != 0
    assert "spec.batchSize" in proc.stderr
    assert "should be greater than or equal to 1" in proc.stderr

"""kube-controller-manager really runs: Deployments get ReplicaSets and Pods,
the scale subresource resizes them, and the garbage collector removes dependents.

There is no node and no scheduler, so the Pods stay Pending; that is all the
operator needs (it manages Deployments, not containers)."""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

LABELS = {"app": "flowfleet-worker"}


def deployment(name: str, replicas: int) -> Any:
    from kubernetes import client

    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name, labels=LABELS),
        spec=client.V1DeploymentSpec(
            replicas=replicas,
            selector=client.V1LabelSelector(match_labels={**LABELS, "deploy": name}),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels={**LABELS, "deploy": name}),
                spec=client.V1PodSpec(
                    containers=[
                        client.V1Container(
                            name="worker", image="registry.invalid/flowfleet-worker:never-pulled"
                        )
                    ]
                ),
            ),
        ),
    )


def owned_by(obj: Any, owner: Any) -> bool:
    return any(
        ref.uid == owner.metadata.uid and ref.controller
        for ref in obj.metadata.owner_references or []
    )


class Cluster:
    def __init__(self, api: Any, namespace: str) -> None:
        from kubernetes import client

        self.apps = client.AppsV1Api(api)
        self.core = client.CoreV1Api(api)
        self.ns = namespace

    def replicasets_of(self, dep: Any) -> list[Any]:
        return [
            rs for rs in self.apps.list_namespaced_replica_set(self.ns).items if owned_by(rs, dep)
        ]

    def pods_of(self, rs: Any) -> list[Any]:
        return [
            p
            for p in self.core.list_namespaced_pod(self.ns).items
            if owned_by(p, rs) and p.metadata.deletion_timestamp is None
        ]

    def wait_for_pods(self, dep: Any, count: int) -> tuple[Any, list[Any]]:
        def ready() -> tuple[Any, list[Any]] | None:
            rss = self.replicasets_of(dep)
            if len(rss) != 1 or rss[0].spec.replicas != count:
                return None
            pods = self.pods_of(rss[0])
            return (rss[0], pods) if len(pods) == count else None

        return wait_until(ready, timeout=90, what=f"{count} pods of {dep.metadata.name}")


@pytest.fixture
def cluster(api: Any, namespace: str) -> Cluster:
    return Cluster(api, namespace)


def test_deployment_creates_replicaset_and_pending_pods(cluster: Cluster) -> None:
    dep = cluster.apps.create_namespaced_deployment(cluster.ns, deployment("workers", 2))
    rs, pods = cluster.wait_for_pods(dep, 2)
    assert rs.metadata.name.startswith("workers-")
    for pod in pods:
        assert pod.status.phase == "Pending"
        assert pod.spec.node_name is None  # no scheduler, no nodes
        assert pod.spec.service_account_name == "default"
    # The deployment controller reports what it did.
    got = wait_until(
        lambda: (
            (d := cluster.apps.read_namespaced_deployment("workers", cluster.ns)).status.replicas
            == 2
            and d
        ),
        timeout=60,
        what="deployment status",
    )
    assert got.status.observed_generation == got.metadata.generation
    assert (got.status.ready_replicas or 0) == 0


def test_scale_subresource_resizes_replicaset_and_pods(cluster: Cluster) -> None:
    dep = cluster.apps.create_namespaced_deployment(cluster.ns, deployment("scaled", 2))
    rs, _ = cluster.wait_for_pods(dep, 2)

    scale = cluster.apps.read_namespaced_deployment_scale("scaled", cluster.ns)
    assert scale.spec.replicas == 2
    assert scale.status.selector  # the selector the HPA and our operator would use
    cluster.apps.patch_namespaced_deployment_scale("scaled", cluster.ns, {"spec": {"replicas": 3}})
    assert cluster.apps.read_namespaced_deployment("scaled", cluster.ns).spec.replicas == 3
    rs3, _ = cluster.wait_for_pods(dep, 3)
    assert rs3.metadata.uid == rs.metadata.uid  # same ReplicaSet, resized, not replaced

    cluster.apps.patch_namespaced_deployment_scale("scaled", cluster.ns, {"spec": {"replicas": 1}})
    cluster.wait_for_pods(dep, 1)


@pytest.mark.parametrize("propagation", ["Background", "Foreground"])
def test_deleting_deployment_garbage_collects_dependents(
    cluster: Cluster, propagation: str
) -> None:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    name = f"doomed-{propagation.lower()}"
    dep = cluster.apps.create_namespaced_deployment(cluster.ns, deployment(name, 2))
    rs, pods = cluster.wait_for_pods(dep, 2)

    cluster.apps.delete_namespaced_deployment(
        name, cluster.ns, body=client.V1DeleteOptions(propagation_policy=propagation)
    )
    if propagation == "Foreground":
        # The owner stays, marked for deletion, until the collector removed its dependents.
        try:
            held = cluster.apps.read_namespaced_deployment(name, cluster.ns)
            assert "foregroundDeletion" in (held.metadata.finalizers or [])
            assert held.metadata.deletion_timestamp is not None
        except ApiException as exc:  # already fully collected: allowed, if fast
            assert exc.status == 404

    def gone() -> bool:
        rs_uids = {
            r.metadata.uid for r in cluster.apps.list_namespaced_replica_set(cluster.ns).items
        }
        pod_uids = {p.metadata.uid for p in cluster.core.list_namespaced_pod(cluster.ns).items}
        deps = {d.metadata.name for d in cluster.apps.list_namespaced_deployment(cluster.ns).items}
        return (
            rs.metadata.uid not in rs_uids
            and name not in deps
            and not {p.metadata.uid for p in pods} & pod_uids
        )

    wait_until(gone, timeout=120, what=f"garbage collection after {propagation} delete")


def test_namespace_deletion_removes_its_contents(api: Any, make_namespace: Any) -> None:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    ns = make_namespace()
    core = client.CoreV1Api(api)
    core.create_namespaced_config_map(
        ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="cfg"), data={"a": "b"})
    )
    core.delete_namespace(ns)

    def ns_gone() -> bool:
        try:
            core.read_namespace(ns)
        except ApiException as exc:
            return exc.status == 404
        return False

    wait_until(ns_gone, timeout=120, what=f"namespace {ns} finalized by the namespace controller")

"""Child manifests, pure: ``build_worker_deployment`` turns a flow's spec into the worker
Deployment the operator applies. Unit tests read what it returns."""

from __future__ import annotations

import re
from typing import Any

from flowfleet import defaults
from flowfleet_operator.model import API_VERSION, KIND, FlowSpec

MANAGED_BY = "flowfleet-operator"
FLOW_LABEL = "flowfleet.io/flow"
INSTANCE_LABEL = "app.kubernetes.io/instance"
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
# Worker pods need a few seconds beyond the worker's own grace to exit and be reaped.
TERMINATION_MARGIN_SECONDS = 5
_LABEL_VALUE = re.compile(r"^(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)$")


def selector_labels(name: str) -> dict[str, str]:
    """Labels that pick a DistributedFlow's worker pods; stable for its lifetime."""
    return {
        "app.kubernetes.io/name": "flowfleet",
        INSTANCE_LABEL: name,
        "app.kubernetes.io/component": "worker",
    }


def selector_string(name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector_labels(name).items())


def worker_labels(name: str, flow_name: str) -> dict[str, str]:
    labels = {**selector_labels(name), "app.kubernetes.io/managed-by": MANAGED_BY}
    # A flow name may be longer than a label value may be; the selector never needs it.
    if _LABEL_VALUE.match(flow_name):
        labels[FLOW_LABEL] = flow_name
    return labels


def worker_args(spec: FlowSpec) -> list[str]:
    return [
        "worker",
        spec.flow_name,
        "--entrypoint",
        spec.entrypoint,
        "--runner",
        spec.runner,
        "--batch-size",
        str(spec.batch_size),
        "--concurrency",
        str(spec.concurrency),
        "--lease-seconds",
        str(spec.lease_seconds),
        "--max-retries",
        str(spec.max_retries),
        "--grace-seconds",
        str(spec.grace_period_seconds),
        "--http-port",
        str(defaults.HTTP_PORT),
        "--log-format",
        "json",
    ]


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def worker_env(spec: FlowSpec, prefect_api_url: str | None) -> list[dict[str, Any]]:
    ref = spec.database.secret_ref
    env: list[dict[str, Any]] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "PREFECT_ENVIRONMENT", "value": spec.environment},
        # The root filesystem is read-only; Prefect keeps its home under the tmp volume.
        {"name": "PREFECT_HOME", "value": "/tmp/prefect"},
        # The connection string only ever travels as a reference to its Secret.
        _secret_env("FLOWFLEET_DSN", ref.name, ref.key),
    ]
    for source in spec.source_databases:
        env.append(
            _secret_env(
                f"{source.name.upper()}_CONNECTION_STRING",
                source.secret_ref.name,
                source.secret_ref.key,
            )
        )
    if prefect_api_url:
        env.append({"name": "PREFECT_API_URL", "value": prefect_api_url})
    key_ref = spec.prefect.api_key_secret_ref
    if key_ref is not None:
        env.append(_secret_env("PREFECT_API_KEY", key_ref.name, key_ref.key))
    user = [dict(e) for e in spec.env]
    # The user's own entries win over ours of the same name, without a duplicate.
    overridden = {e.get("name") for e in user}
    return [e for e in env if e["name"] not in overridden] + user


def _pod_spec(spec: FlowSpec, prefect_api_url: str | None) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "worker",
        "image": spec.image,
        "args": worker_args(spec),
        "env": worker_env(spec, prefect_api_url),
        "ports": [{"name": "http", "containerPort": defaults.HTTP_PORT, "protocol": "TCP"}],
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    if spec.resources:
        container["resources"] = spec.resources
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    pod: dict[str, Any] = {
        "terminationGracePeriodSeconds": spec.grace_period_seconds + TERMINATION_MARGIN_SECONDS,
        # Workers talk to PostgreSQL, not to the API server: no token unless asked for.
        "automountServiceAccountToken": spec.service_account_name is not None,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }
    optional = {
        "serviceAccountName": spec.service_account_name,
        "priorityClassName": spec.priority_class_name,
        "nodeSelector": spec.node_selector,
        "affinity": spec.affinity,
        "tolerations": list(spec.tolerations) if spec.tolerations is not None else None,
        "imagePullSecrets": (
            list(spec.image_pull_secrets) if spec.image_pull_secrets is not None else None
        ),
    }
    pod.update({k: v for k, v in optional.items() if v is not None})
    return pod


def build_worker_deployment(
    name: str,
    namespace: str,
    uid: str,
    spec: FlowSpec,
    replicas: int,
    prefect_api_url: str | None,
) -> dict[str, Any]:
    """The worker Deployment of DistributedFlow ``namespace/name``. ``replicas`` is what
    the Deployment has now (or starts with): applying never changes the count."""
    labels = worker_labels(name, spec.flow_name)
    template_meta: dict[str, Any] = {"labels": {**(spec.pod_labels or {}), **labels}}
    if spec.pod_annotations:
        template_meta["annotations"] = dict(spec.pod_annotations)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": KIND,
                    "name": name,
                    "uid": uid,
                    "controller": True,
                }
            ],
        },
        "spec": {
            "replicas": replicas,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector_labels(name)},
            "template": {"metadata": template_meta, "spec": _pod_spec(spec, prefect_api_url)},
        },
    }


def deletion_costs(pods: list[str], in_flight: dict[str, int]) -> dict[str, int]:
    """``controller.kubernetes.io/pod-deletion-cost`` per pod: its in-flight record count,
    so the ReplicaSet removes idle pods (cost 0) first and the busiest last."""
    return {pod: int(in_flight.get(pod, 0)) for pod in sorted(pods)}


def scale_in_victims(pods: list[str], in_flight: dict[str, int], remove: int) -> list[str]:
    """The pods a scale-in by ``remove`` should take, idle ones first (for messages and
    tests; the ReplicaSet decides, guided by the costs)."""
    order = sorted(pods, key=lambda pod: (in_flight.get(pod, 0), pod))
    return order[: max(0, remove)]

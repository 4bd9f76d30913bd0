"""The worker Deployment builder and the scale-in ordering: pure functions."""

from __future__ import annotations

from typing import Any

from flowfleet_operator.manifests import (
    build_worker_deployment,
    deletion_costs,
    scale_in_victims,
    selector_string,
)
from flowfleet_operator.model import FlowSpec, parse_spec

BASE: dict[str, Any] = {
    "flowName": "survey_processor",
    "image": "flowfleet:dev",
    "entrypoint": "flowfleet.examples:survey_processor",
    "database": {"secretRef": {"name": "rpa-db-secret", "key": "connection-string"}},
}


def spec(**extra: Any) -> FlowSpec:
    return parse_spec({**BASE, **extra})


def build(s: FlowSpec, replicas: int = 0, api: str | None = "http://prefect:4200/api") -> Any:
    return build_worker_deployment("survey", "ns1", "uid-1", s, replicas, api)


def container(d: dict[str, Any]) -> dict[str, Any]:
    (c,) = d["spec"]["template"]["spec"]["containers"]
    return c


def env_of(d: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container(d)["env"]}


def test_owner_labels_and_selector() -> None:
    d = build(spec())
    assert d["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "flowfleet.io/v1alpha1",
            "kind": "DistributedFlow",
            "name": "survey",
            "uid": "uid-1",
            "controller": True,
        }
    ]
    labels = d["spec"]["template"]["metadata"]["labels"]
    assert labels == {
        "app.kubernetes.io/name": "flowfleet",
        "app.kubernetes.io/instance": "survey",
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/managed-by": "flowfleet-operator",
        "flowfleet.io/flow": "survey_processor",
    }
    selector = d["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert selector_string("survey") == ",".join(f"{k}={v}" for k, v in selector.items())


def test_args_carry_every_worker_setting() -> None:
    d = build(
        spec(
            runner="plain",
            batchSize=20,
            concurrency=2,
            leaseSeconds=40,
            maxRetries=5,
            gracePeriodSeconds=50,
        )
    )
    args = container(d)["args"]
    assert args[:2] == ["worker", "survey_processor"]
    pairs = dict(zip(args[2::2], args[3::2], strict=True))
    assert pairs == {
        "--entrypoint": "flowfleet.examples:survey_processor",
        "--runner": "plain",
        "--batch-size": "20",
        "--concurrency": "2",
        "--lease-seconds": "40",
        "--max-retries": "5",
        "--grace-seconds": "50",
        "--http-port": "8080",
        "--log-format": "json",
    }
    # The pod outlives the worker's own grace.
    assert d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 50


def test_dsn_only_by_secret_reference_and_pod_name_from_downward_api() -> None:
    env = env_of(build(spec()))
    assert env["FLOWFLEET_DSN"] == {
        "name": "FLOWFLEET_DSN",
        "valueFrom": {"secretKeyRef": {"name": "rpa-db-secret", "key": "connection-string"}},
    }
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["PREFECT_ENVIRONMENT"]["value"] == "production"
    assert env["PREFECT_API_URL"]["value"] == "http://prefect:4200/api"
    assert all("value" not in e or "postgresql" not in e["value"] for e in env.values())


def test_source_databases_prefect_key_and_user_env() -> None:
    s = spec(
        environment="staging",
        sourceDatabases=[{"name": "survey_db", "secretRef": {"name": "survey-secret"}}],
        prefect={
            "apiUrl": "https://api.prefect.cloud/api/accounts/a/workspaces/w",
            "apiKeySecretRef": {"name": "prefect-key"},
        },
        env=[
            {"name": "GLOBAL_TIMEOUT", "value": "5"},
            {"name": "PREFECT_ENVIRONMENT", "value": "qa"},
        ],
    )
    env = env_of(build(s, api=None))
    assert env["SURVEY_DB_CONNECTION_STRING"]["valueFrom"] == {
        "secretKeyRef": {"name": "survey-secret", "key": "connection-string"}
    }
    assert env["PREFECT_API_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "prefect-key", "key": "api-key"}
    }
    assert env["GLOBAL_TIMEOUT"]["value"] == "5"
    # The user's entry wins, once.
    names = [e["name"] for e in container(build(s, api=None))["env"]]
    assert names.count("PREFECT_ENVIRONMENT") == 1
    assert env["PREFECT_ENVIRONMENT"]["value"] == "qa"


def test_probes_and_non_root_security_context() -> None:
    d = build(spec())
    c = container(d)
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    pod = d["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["automountServiceAccountToken"] is False


def test_pod_pass_through() -> None:
    s = spec(
        nodeSelector={"pool": "batch"},
        tolerations=[{"key": "batch", "operator": "Exists"}],
        affinity={"nodeAffinity": {}},
        imagePullSecrets=[{"name": "regcred"}],
        imagePullPolicy="Always",
        serviceAccountName="survey-sa",
        priorityClassName="low",
        podLabels={"team": "rpa"},
        podAnnotations={"prometheus.io/scrape": "true"},
        resources={"requests": {"cpu": "250m"}},
    )
    d = build(s)
    pod = d["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "batch"}
    assert pod["tolerations"] == [{"key": "batch", "operator": "Exists"}]
    assert pod["affinity"] == {"nodeAffinity": {}}
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["serviceAccountName"] == "survey-sa"
    assert pod["automountServiceAccountToken"] is True
    assert pod["priorityClassName"] == "low"
    assert container(d)["imagePullPolicy"] == "Always"
    assert container(d)["resources"] == {"requests": {"cpu": "250m"}}
    meta = d["spec"]["template"]["metadata"]
    assert meta["labels"]["team"] == "rpa"
    assert meta["annotations"] == {"prometheus.io/scrape": "true"}


def test_replicas_are_what_the_caller_says_and_the_template_does_not_depend_on_them() -> None:
    a, b = build(spec(), replicas=0), build(spec(), replicas=7)
    assert (a["spec"]["replicas"], b["spec"]["replicas"]) == (0, 7)
    assert a["spec"]["template"] == b["spec"]["template"]


def test_pinning_does_not_change_the_pod_template() -> None:
    assert build(spec())["spec"]["template"] == build(spec(replicas=3))["spec"]["template"]


def test_a_flow_name_too_long_for_a_label_is_left_out_of_labels_only() -> None:
    d = build(spec(flowName="f" * 80))
    assert "flowfleet.io/flow" not in d["metadata"]["labels"]
    assert container(d)["args"][1] == "f" * 80


def test_deletion_costs_put_idle_pods_first() -> None:
    pods = ["w-a", "w-b", "w-c", "w-d"]
    in_flight = {"w-b": 50, "w-d": 3, "gone-pod": 9}
    costs = deletion_costs(pods, in_flight)
    assert costs == {"w-a": 0, "w-b": 50, "w-c": 0, "w-d": 3}
    # The ReplicaSet removes the lowest cost first: idle, then least busy.
    assert sorted(pods, key=lambda p: costs[p])[:2] == ["w-a", "w-c"]
    assert scale_in_victims(pods, in_flight, 3) == ["w-a", "w-c", "w-d"]
    assert scale_in_victims(pods, in_flight, 0) == []

"""The Helm chart (charts/flowfleet) with a real helm against the real control plane:
lint, render, server-side dry run, install and uninstall, and its RBAC proven by the API
server's own authorizer (`kubectl auth can-i --as=<the operator's ServiceAccount>`)."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from .chart_fixtures import (
    CHART,
    OPERATOR_NAMESPACE,
    OPERATOR_SERVICE_ACCOUNT,
    Helm,
    service_account_token,
    write_token_kubeconfig,
)
from .conftest import CRD_FILE, ControlPlane, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

CRD_NAME = "distributedflows.flowfleet.io"

# Every API call the operator makes (the operator contract); the chart grants exactly these.
# (api group, resource[/subresource], verbs)
CLUSTER_SCOPED_RULES = [
    ("apiextensions.k8s.io", "customresourcedefinitions", ["list", "watch"]),
    ("", "namespaces", ["list", "watch"]),
]
NAMESPACED_RULES = [
    ("flowfleet.io", "distributedflows", ["get", "list", "watch", "patch"]),
    ("flowfleet.io", "distributedflows/status", ["get", "patch"]),
    ("flowfleet.io", "distributedflows/scale", ["get"]),
    ("apps", "deployments", ["get", "list", "watch", "create", "patch"]),
    ("apps", "deployments/scale", ["get", "patch"]),
    ("", "secrets", ["get"]),
    ("", "pods", ["get", "list", "watch", "patch"]),
    ("", "events", ["create", "patch"]),
    ("events.k8s.io", "events", ["create", "patch"]),
]
# Namespaced things the operator must never be able to do (verb, group, resource[/sub]).
NAMESPACED_DENIED = [
    ("delete", "apps", "deployments"),
    ("deletecollection", "apps", "deployments"),
    ("update", "apps", "deployments"),
    ("update", "apps", "deployments/scale"),
    ("delete", "flowfleet.io", "distributedflows"),
    ("create", "flowfleet.io", "distributedflows"),
    ("update", "flowfleet.io", "distributedflows"),
    ("patch", "flowfleet.io", "distributedflows/scale"),
    ("list", "", "secrets"),
    ("watch", "", "secrets"),
    ("create", "", "secrets"),
    ("patch", "", "secrets"),
    ("delete", "", "secrets"),
    ("create", "", "pods"),
    ("delete", "", "pods"),
    ("create", "", "pods/exec"),
    ("get", "", "pods/log"),
    ("get", "", "configmaps"),
    ("create", "", "serviceaccounts/token"),
    ("delete", "", "events"),
    ("create", "rbac.authorization.k8s.io", "rolebindings"),
    ("create", "batch", "jobs"),
]
CLUSTER_DENIED = [
    ("get", "apiextensions.k8s.io", "customresourcedefinitions"),
    ("create", "apiextensions.k8s.io", "customresourcedefinitions"),
    ("delete", "apiextensions.k8s.io", "customresourcedefinitions"),
    ("create", "", "namespaces"),
    ("delete", "", "namespaces"),
    ("create", "rbac.authorization.k8s.io", "clusterrolebindings"),
    ("escalate", "rbac.authorization.k8s.io", "clusterroles"),
    ("bind", "rbac.authorization.k8s.io", "clusterroles"),
    ("impersonate", "", "users"),
    ("list", "", "nodes"),
    ("*", "*", "*"),
]


def rule_set(rules: list[tuple[str, str, list[str]]]) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for group, resource, verbs in rules for verb in verbs}


def policy_rule_set(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(group, resource, verb) for each combination a list of PolicyRules grants."""
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule.get("apiGroups") or rule.get("api_groups") or []
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def documents(rendered: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


def kinds(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = kinds(docs, kind)
    return doc


def deployment_manifest(name: str, labels: dict[str, str], replicas: int) -> Any:
    """A Deployment whose pods stay Pending here (no node): enough to watch and scale."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]},
            },
        },
    }


def env_of(deployment: dict[str, Any]) -> dict[str, str]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", "") for e in container["env"]}


# ---------------------------------------------------------------- lint, render ----


def test_lint_is_clean_in_strict_mode(helm: Helm) -> None:
    for values in (
        [],
        ["--set", "watchNamespaces={team-a,team-b}", "--set", "serviceMonitor.enabled=true"],
        ["--set", "prefectApiUrl=http://prefect.prefect.svc:4200/api", "--set", "logLevel=DEBUG"],
    ):
        out = helm.run("lint", "--strict", str(CHART), *values).stdout
        assert "1 chart(s) linted, 0 chart(s) failed" in out, out
        assert "[WARNING]" not in out and "[ERROR]" not in out, out


def test_bad_values_are_refused_naming_the_value(helm: Helm) -> None:
    for setting, field in (
        ("logLevel=LOUD", "/logLevel"),
        ("logFormat=xml", "/logFormat"),
        ("watchNamespaces={Not_A_Namespace}", "/watchNamespaces/0"),
        ("prefectApiUrl=prefect:4200", "/prefectApiUrl"),
    ):
        proc = helm.run("template", "ff", str(CHART), "--set", setting, check=False)
        assert proc.returncode != 0, f"{setting} was accepted"
        assert field in proc.stderr, proc.stderr


def test_operator_deployment_as_rendered(helm: Helm) -> None:
    docs = documents(helm.template(release="ff", namespace="ops"))
    dep = one(docs, "Deployment")
    assert dep["metadata"] == {
        **dep["metadata"],
        "name": "ff-flowfleet-operator",
        "namespace": "ops",
    }
    spec = dep["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert container["command"] == ["flowfleet", "operator"]
    assert container["image"] == "flowfleet:0.1.0"  # the chart's appVersion
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert env_of(dep) == {
        "FLOWFLEET_OPERATOR_NAMESPACES": "",
        "FLOWFLEET_OPERATOR_PREFECT_API_URL": "",
        "FLOWFLEET_OPERATOR_LOG_LEVEL": "INFO",
        "FLOWFLEET_OPERATOR_LOG_FORMAT": "json",
        "FLOWFLEET_OPERATOR_HTTP_PORT": "8080",
    }
    # The Service selects exactly the operator pod (not the worker pods the operator makes).
    service = one(docs, "Service")
    assert service["spec"]["selector"] == spec["selector"]["matchLabels"]
    assert spec["selector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
    assert service["spec"]["ports"][0]["name"] == "http-metrics"
    assert not kinds(docs, "ServiceMonitor")


def test_values_overrides_render(helm: Helm) -> None:
    docs = documents(
        helm.template(
            "--set", "watchNamespaces={team-a,team-b}",
            "--set", "prefectApiUrl=http://prefect.prefect.svc:4200/api",
            "--set", "logLevel=DEBUG", "--set", "logFormat=text", "--set", "httpPort=9090",
            "--set", "image.repository=registry.example/flowfleet", "--set", "image.tag=1.2.3",
            "--set", "serviceMonitor.enabled=true", "--set", "serviceMonitor.labels.release=kps",
        )
    )  # fmt: skip
    dep = one(docs, "Deployment")
    assert env_of(dep) == {
        "FLOWFLEET_OPERATOR_NAMESPACES": "team-a,team-b",
        "FLOWFLEET_OPERATOR_PREFECT_API_URL": "http://prefect.prefect.svc:4200/api",
        "FLOWFLEET_OPERATOR_LOG_LEVEL": "DEBUG",
        "FLOWFLEET_OPERATOR_LOG_FORMAT": "text",
        "FLOWFLEET_OPERATOR_HTTP_PORT": "9090",
    }
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example/flowfleet:1.2.3"
    assert container["ports"][0]["containerPort"] == 9090

    monitor = one(docs, "ServiceMonitor")
    service = one(docs, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    assert endpoint["path"] == "/metrics"
    assert service["spec"]["ports"][0]["port"] == 9090

    # Namespaces given: namespaced rights only through a RoleBinding in each of them.
    bindings = kinds(docs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    roles = {r["metadata"]["name"]: r for r in kinds(docs, "ClusterRole")}
    assert {b["roleRef"]["name"] for b in bindings} == {"ff-flowfleet-operator-namespaced"}
    assert policy_rule_set(roles["ff-flowfleet-operator"]["rules"]) == rule_set(
        CLUSTER_SCOPED_RULES
    )
    assert policy_rule_set(roles["ff-flowfleet-operator-namespaced"]["rules"]) == rule_set(
        NAMESPACED_RULES
    )


def test_cluster_role_is_exactly_the_contract(helm: Helm) -> None:
    docs = documents(helm.template())
    (role,) = kinds(docs, "ClusterRole")
    assert policy_rule_set(role["rules"]) == rule_set(CLUSTER_SCOPED_RULES + NAMESPACED_RULES)
    assert not any("delete" in rule["verbs"] or "*" in rule["verbs"] for rule in role["rules"])
    assert not kinds(docs, "RoleBinding")
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    sa = one(docs, "ServiceAccount")["metadata"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}
    ]
    # Every rule says why (the comment above it in the template).
    rbac = (CHART / "templates" / "rbac.yaml").read_text().splitlines()
    firsts = [i for i, line in enumerate(rbac) if line.startswith("- apiGroups:")]
    assert len(firsts) == len(CLUSTER_SCOPED_RULES) + len(NAMESPACED_RULES)
    uncommented = [rbac[i] + rbac[i + 1] for i in firsts if not rbac[i - 1].startswith("# ")]
    assert uncommented == []


# ------------------------------------------------------------ on the API server ----


@dataclass
class Release:
    name: str
    namespace: str

    @property
    def service_account(self) -> str:
        return f"{self.name}-flowfleet-operator"

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


@pytest.fixture
def install(helm: Helm, make_namespace: Callable[[], str]) -> Iterator[Callable[..., Release]]:
    """Installs the chart as a fresh release in a fresh namespace; uninstalls at the end."""
    releases: list[Release] = []

    def do_install(*values: str) -> Release:
        release = Release(name=f"ff-{uuid.uuid4().hex[:6]}", namespace=make_namespace())
        helm.run("install", release.name, str(CHART), "--namespace", release.namespace, *values)
        releases.append(release)
        return release

    yield do_install
    for release in releases:
        helm.run("uninstall", release.name, "--namespace", release.namespace, check=False)


def can_i(
    cp: ControlPlane,
    user: str,
    verb: str,
    group: str,
    resource: str,
    namespace: str | None = None,
    all_namespaces: bool = False,
) -> bool:
    """The API server's answer (SubjectAccessReview through kubectl) for the user."""
    name, _, sub = resource.partition("/")
    args = ["auth", "can-i", verb, f"{name}.{group}" if group else name, f"--as={user}"]
    if sub:
        args.append(f"--subresource={sub}")
    if all_namespaces:
        args.append("--all-namespaces")
    elif namespace:
        args += ["--namespace", namespace]
    proc = cp.kubectl(*args, check=False)
    answer = proc.stdout.split()[0] if proc.stdout.split() else ""
    assert answer in ("yes", "no"), f"kubectl {' '.join(args)}: {proc.stdout}{proc.stderr}"
    return answer == "yes"


def sar_can_i(
    api: Any,
    user: str,
    verb: str,
    group: str,
    resource: str,
    namespace: str | None = None,
    all_namespaces: bool = False,
) -> bool:
    """The same question as a SubjectAccessReview through the API: no kubectl start-up per
    check. The groups are the ones a ServiceAccount token carries."""
    from kubernetes import client

    name, _, sub = resource.partition("/")
    sa_namespace = user.split(":")[2]
    review: Any = client.AuthorizationV1Api(api).create_subject_access_review(
        client.V1SubjectAccessReview(
            spec=client.V1SubjectAccessReviewSpec(
                user=user,
                groups=[
                    "system:serviceaccounts",
                    f"system:serviceaccounts:{sa_namespace}",
                    "system:authenticated",
                ],
                resource_attributes=client.V1ResourceAttributes(
                    verb=verb,
                    group=group,
                    resource=name,
                    subresource=sub or None,
                    namespace=None if all_namespaces else namespace,
                ),
            )
        )
    )
    return bool(review.status.allowed)


Asker = Callable[..., bool]


def denied_among(
    ask: Asker, who: Any, user: str, checks: list[tuple[str, str, str]], **where: Any
) -> list[tuple[str, str, str]]:
    return [c for c in checks if not ask(who, user, *c, **where)]


def allowed_among(
    ask: Asker, who: Any, user: str, checks: list[tuple[str, str, str]], **where: Any
) -> list[tuple[str, str, str]]:
    return [c for c in checks if ask(who, user, *c, **where)]


def as_checks(rules: list[tuple[str, str, list[str]]]) -> list[tuple[str, str, str]]:
    return [(verb, group, resource) for group, resource, verbs in rules for verb in verbs]


def test_rendered_chart_passes_server_side_dry_run(
    control_plane: ControlPlane, helm: Helm, make_namespace: Callable[[], str]
) -> None:
    release_ns, watched = make_namespace(), make_namespace()
    for values in ([], ["--set", f"watchNamespaces={{{watched}}}"]):
        rendered = helm.template("--include-crds", *values, namespace=release_ns)
        # Every namespaced object names its namespace (the RoleBindings: the watched one).
        out = control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered).stdout
        lines = out.splitlines()
        assert all(line.endswith("(server dry run)") for line in lines), out
        assert len(lines) == len(documents(rendered))
        assert f"customresourcedefinition.apiextensions.k8s.io/{CRD_NAME}" in out


def test_install_and_uninstall_keep_the_crd(
    control_plane: ControlPlane, helm: Helm, install: Callable[..., Release], api: Any
) -> None:
    from kubernetes import client

    crd_before = control_plane.kubectl("get", "crd", CRD_NAME, check=False).returncode == 0
    release = install()
    ns, name = release.namespace, release.service_account

    status = helm.run("status", release.name, "--namespace", ns, "-o", "json").stdout
    assert '"status":"deployed"' in status.replace(" ", "")
    notes = helm.run("get", "notes", release.name, "--namespace", ns).stdout
    assert f"kubectl -n {ns} rollout status deployment/{name}" in notes
    assert "every namespace" in notes and "PrefectApiUrlMissing" in notes
    # The CRD is there whether this install made it (crds/) or an earlier test did.
    assert control_plane.kubectl("get", "crd", CRD_NAME).returncode == 0

    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    dep: Any = apps.read_namespaced_deployment(name, ns)
    assert dep.spec.replicas == 1 and dep.spec.strategy.type == "Recreate"
    # The pod exists (admission accepted its security context) and stays Pending: no node.
    selector = ",".join(f"{k}={v}" for k, v in dep.spec.selector.match_labels.items())
    pods = wait_until(
        lambda: core.list_namespaced_pod(ns, label_selector=selector).items,
        timeout=60,
        what="the operator pod",
    )
    assert [p.status.phase for p in pods] == ["Pending"]
    assert pods[0].spec.service_account_name == name
    assert pods[0].spec.security_context.run_as_user == 10001
    assert pods[0].spec.containers[0].security_context.read_only_root_filesystem is True
    role: Any = client.RbacAuthorizationV1Api(api).read_cluster_role(name)
    assert policy_rule_set([r.to_dict() for r in role.rules]) == rule_set(
        CLUSTER_SCOPED_RULES + NAMESPACED_RULES
    )

    helm.run("uninstall", release.name, "--namespace", ns)
    assert control_plane.kubectl("get", "deployment", name, "-n", ns, check=False).returncode != 0
    gone = control_plane.kubectl("get", "clusterrole", name, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr
    # Helm never deletes what it installed from crds/: DistributedFlows survive an uninstall.
    kept = control_plane.kubectl("get", "crd", CRD_NAME, "-o", "jsonpath={.spec.names.kind}")
    assert kept.stdout == "DistributedFlow"
    if not crd_before:
        # This install created it from crds/: it is the chart's copy of the repo's CRD.
        served = yaml.safe_load(control_plane.kubectl("get", "crd", CRD_NAME, "-o", "yaml").stdout)
        source = yaml.safe_load(Path(CRD_FILE).read_text())
        assert served["spec"]["names"]["shortNames"] == source["spec"]["names"]["shortNames"]


def test_cluster_wide_rbac_on_the_api_server(
    control_plane: ControlPlane, install: Callable[..., Release], namespace: str
) -> None:
    release = install()
    user, cp = release.user, control_plane
    # Everything the contract lists, in any namespace (cluster-wide mode) ...
    assert denied_among(can_i, cp, user, as_checks(NAMESPACED_RULES), namespace=namespace) == []
    watchable = [c for c in as_checks(NAMESPACED_RULES) if c[0] in ("list", "watch")]
    assert denied_among(can_i, cp, user, watchable, all_namespaces=True) == []
    assert denied_among(can_i, cp, user, as_checks(CLUSTER_SCOPED_RULES)) == []
    # ... which, for a ClusterRole, includes `get secrets` in every namespace: the reason to
    # set watchNamespaces where the operator should not reach every Secret.
    assert can_i(cp, user, "get", "", "secrets", namespace="kube-system")
    # ... and nothing else.
    assert allowed_among(can_i, cp, user, NAMESPACED_DENIED, namespace=namespace) == []
    assert allowed_among(can_i, cp, user, CLUSTER_DENIED) == []
    assert not can_i(cp, user, "list", "", "secrets", all_namespaces=True)


def test_namespaced_rbac_on_the_api_server(
    control_plane: ControlPlane, install: Callable[..., Release], make_namespace: Any, api: Any
) -> None:
    # ~150 questions, asked as SubjectAccessReviews: one API call each instead of a kubectl
    # start-up. The same authorizer answers `kubectl auth can-i`, as the first lines show.
    team_a, team_b, elsewhere = make_namespace(), make_namespace(), make_namespace()
    release = install("--set", f"watchNamespaces={{{team_a},{team_b}}}")
    user, ask = release.user, sar_can_i
    assert can_i(control_plane, user, "get", "", "secrets", namespace=team_a)
    assert ask(api, user, "get", "", "secrets", namespace=team_a)
    assert not can_i(control_plane, user, "get", "", "secrets", namespace=elsewhere)
    assert not ask(api, user, "get", "", "secrets", namespace=elsewhere)
    for ns in (team_a, team_b):
        assert denied_among(ask, api, user, as_checks(NAMESPACED_RULES), namespace=ns) == []
        assert allowed_among(ask, api, user, NAMESPACED_DENIED, namespace=ns) == []
    # Outside the watched namespaces, including its own: nothing namespaced at all.
    for ns in (elsewhere, release.namespace, "kube-system"):
        assert allowed_among(ask, api, user, as_checks(NAMESPACED_RULES), namespace=ns) == []
    watchable = [c for c in as_checks(NAMESPACED_RULES) if c[0] in ("list", "watch")]
    assert allowed_among(ask, api, user, watchable, all_namespaces=True) == []
    # kopf's cluster-scoped needs stay.
    assert denied_among(ask, api, user, as_checks(CLUSTER_SCOPED_RULES)) == []
    assert allowed_among(ask, api, user, CLUSTER_DENIED) == []


# ------------------------------------------- the operator's kubeconfig fixture ----


def test_chart_operator_kubeconfig_is_the_operator_service_account(
    control_plane: ControlPlane, chart_operator_kubeconfig: Path, api: Any, namespace: str
) -> None:
    from kubernetes import client, config

    kubeconfig = chart_operator_kubeconfig
    assert kubeconfig.stat().st_mode & 0o077 == 0  # holds a token: owner only
    as_operator = ("--kubeconfig", str(kubeconfig))

    def kubectl(*args: str) -> Any:
        # cp.kubectl passes the admin kubeconfig first; a later --kubeconfig wins.
        return control_plane.kubectl(*as_operator, *args, check=False)

    whoami = kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
    assert whoami.stdout == (
        f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SERVICE_ACCOUNT}"
    ), whoami.stderr

    listed = kubectl("get", "distributedflows", "--all-namespaces", "-o", "name")
    assert listed.returncode == 0, listed.stderr

    # With the Python client too (what kopf and the operator load the kubeconfig with).
    with config.new_client_from_config(config_file=str(kubeconfig)) as operator_api:
        objs = client.CustomObjectsApi(operator_api)
        assert objs.list_cluster_custom_object("flowfleet.io", "v1alpha1", "distributedflows")

    apps: Any = client.AppsV1Api(api)
    apps.create_namespaced_deployment(
        namespace, deployment_manifest("keep-me", {"app": "keep-me"}, replicas=0)
    )
    deleted = kubectl("delete", "deployment", "keep-me", "--namespace", namespace)
    assert deleted.returncode != 0
    assert "Forbidden" in deleted.stderr
    assert 'cannot delete resource "deployments"' in deleted.stderr
    assert apps.read_namespaced_deployment("keep-me", namespace).metadata.name == "keep-me"
    # What the operator does to a Deployment is allowed: scale it through /scale.
    scaled = kubectl("scale", "deployment", "keep-me", "--replicas=2", "--namespace", namespace)
    assert scaled.returncode == 0, scaled.stderr
    assert apps.read_namespaced_deployment("keep-me", namespace).spec.replicas == 2


# ------------------------------------------------- kopf under the chart's RBAC ----


def run_kopf_as(
    kubeconfig: Path,
    label: str,
    namespaces: list[str],
    act: Callable[[], None],
    until: Callable[[dict[str, set[str]]], bool],
) -> tuple[dict[str, set[str]], str]:
    """Runs a kopf operator (standalone, as the flowfleet operator runs) that logs in with
    the kubeconfig and handles only objects labelled e2e-kopf=<label>; calls act() once it
    is up and stops once until(seen) holds. Returns what it saw and its log."""
    import kopf
    from kopf.testing import KopfRunner

    registry = kopf.OperatorRegistry()
    settings = kopf.OperatorSettings()
    # Our own annotation prefix: the flowfleet operator's state (flowfleet.io) stays untouched.
    prefix = "e2e-kopf.flowfleet.io"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=prefix)
    settings.persistence.finalizer = f"{prefix}/finalizer"
    settings.posting.level = 0  # post every event kopf logs for an object
    seen: dict[str, set[str]] = {"created": set(), "pods": set(), "deployments": set()}
    only_ours = {"e2e-kopf": label}

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> Any:
        return kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.create(
        "flowfleet.io", "v1alpha1", "distributedflows", labels=only_ours, registry=registry
    )
    def created(name: str, body: Any, patch: Any, **_: Any) -> None:
        patch.metadata.annotations[f"{prefix}/seen"] = "yes"
        kopf.info(body, reason="Seen", message="handled under the chart's RBAC")
        seen["created"].add(name)

    @kopf.on.event("", "v1", "pods", labels=only_ours, registry=registry)
    def pod_event(name: str, **_: Any) -> None:
        seen["pods"].add(name)

    @kopf.on.event("apps", "v1", "deployments", labels=only_ours, registry=registry)
    def deployment_event(name: str, **_: Any) -> None:
        seen["deployments"].add(name)

    scope = [arg for ns in namespaces for arg in ("--namespace", ns)] or ["--all-namespaces"]
    old = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(kubeconfig)  # read by the login handler
    try:
        with KopfRunner(
            ["run", "--standalone", "--verbose", *scope],
            registry=registry,
            settings=settings,
            timeout=60,
        ) as runner:
            act()
            wait_until(lambda: until(seen), timeout=60, what=f"kopf to see {seen}")
    finally:
        if old is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = old
    assert runner.exit_code == 0, runner.output
    return seen, runner.output


def make_flow_and_deployment(api: Any, namespace: str, label: str) -> None:
    from kubernetes import client

    labels = {"e2e-kopf": label}
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        "flowfleet.io",
        "v1alpha1",
        namespace,
        "distributedflows",
        {
            "apiVersion": "flowfleet.io/v1alpha1",
            "kind": "DistributedFlow",
            "metadata": {"name": "watched", "labels": labels},
            "spec": {
                "flowName": "ingest-orders",
                "image": "ghcr.io/example/orders-worker:1.0",
                "entrypoint": "orders.flows:process_batch",
                "database": {"secretRef": {"name": "orders-db"}},
            },
        },
    )
    client.AppsV1Api(api).create_namespaced_deployment(
        namespace, deployment_manifest("workers", labels, replicas=1)
    )


def assert_kopf_did_its_work(api: Any, namespace: str, seen: dict[str, set[str]], log: str) -> None:
    from kubernetes import client

    assert seen["created"] == {"watched"} and seen["deployments"] == {"workers"}
    assert len(seen["pods"]) == 1  # the ReplicaSet's pod (Pending: no node)
    flow: Any = client.CustomObjectsApi(api).get_namespaced_custom_object(
        "flowfleet.io", "v1alpha1", namespace, "distributedflows", "watched"
    )
    assert flow["metadata"]["annotations"]["e2e-kopf.flowfleet.io/seen"] == "yes"  # patch
    events = client.CoreV1Api(api).list_namespaced_event(namespace).items
    assert "Seen" in {e.reason for e in events if e.involved_object.name == "watched"}
    # Milliseconds of a log timestamp ("12:00:01,403") are not a refusal.
    words = re.sub(r":\d\d,\d{3}\b", ":", log)
    for refusal in ("Forbidden", "403", "Not enough permissions", "Unauthorized"):
        assert not re.search(rf"\b{refusal}\b", words), log


def test_kopf_runs_under_the_chart_service_account_cluster_wide(
    chart_operator_kubeconfig: Path, api: Any, namespace: str
) -> None:
    label = uuid.uuid4().hex[:8]
    seen, log = run_kopf_as(
        chart_operator_kubeconfig,
        label,
        namespaces=[],
        act=lambda: make_flow_and_deployment(api, namespace, label),
        until=lambda s: bool(s["created"] and s["pods"] and s["deployments"]),
    )
    assert_kopf_did_its_work(api, namespace, seen, log)


def test_kopf_runs_under_the_chart_service_account_namespaced(
    control_plane: ControlPlane,
    install: Callable[..., Release],
    make_namespace: Callable[[], str],
    api: Any,
    tmp_path: Path,
) -> None:
    watched, unwatched = make_namespace(), make_namespace()
    release = install("--set", f"watchNamespaces={{{watched}}}")
    token = service_account_token(control_plane, release.namespace, release.service_account)
    kubeconfig = write_token_kubeconfig(tmp_path / "kubeconfig", control_plane, token, "op")
    label = uuid.uuid4().hex[:8]

    def act() -> None:
        make_flow_and_deployment(api, unwatched, label)  # outside its reach: never seen
        make_flow_and_deployment(api, watched, label)

    seen, log = run_kopf_as(
        kubeconfig,
        label,
        namespaces=[watched],
        act=act,
        until=lambda s: bool(s["created"] and s["pods"] and s["deployments"]),
    )
    assert_kopf_did_its_work(api, watched, seen, log)

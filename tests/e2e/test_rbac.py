"""RBAC is really enforced: a service account's bound token (TokenRequest) gets
exactly what its Role grants, in its own namespace only."""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import ControlPlane, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


@pytest.fixture
def reader(api: Any, make_namespace: Any) -> dict[str, Any]:
    """ServiceAccount `reader` in `home` that may get/list configmaps there, and
    another namespace `other`; both hold a configmap."""
    from kubernetes import client

    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    home, other = make_namespace(), make_namespace()
    for ns in (home, other):
        core.create_namespaced_config_map(
            ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=f"cfg-{ns}"), data={"k": "v"})
        )
        core.create_namespaced_secret(
            ns,
            client.V1Secret(
                metadata=client.V1ObjectMeta(name="s"), string_data={"password": "hunter2"}
            ),
        )
    core.create_namespaced_service_account(
        home, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="reader"))
    )
    rbac.create_namespaced_role(
        home,
        client.V1Role(
            metadata=client.V1ObjectMeta(name="configmap-reader"),
            rules=[
                client.V1PolicyRule(
                    api_groups=[""], resources=["configmaps"], verbs=["get", "list"]
                )
            ],
        ),
    )
    rbac.create_namespaced_role_binding(
        home,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="reader-reads-configmaps"),
            role_ref=client.V1RoleRef(
                api_group="rbac.authorization.k8s.io", kind="Role", name="configmap-reader"
            ),
            subjects=[client.RbacV1Subject(kind="ServiceAccount", name="reader", namespace=home)],
        ),
    )
    token_request = core.create_namespaced_service_account_token(
        "reader",
        home,
        client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=600)
        ),
    )
    token = token_request.status.token
    assert token.count(".") == 2  # a signed JWT
    return {"home": home, "other": other, "token": token, "core": core}


def status_of(call: Any, *args: Any) -> int:
    from kubernetes.client.rest import ApiException

    try:
        call(*args)
    except ApiException as exc:
        return int(exc.status)
    return 200


def test_token_gets_exactly_what_the_role_grants(
    control_plane: ControlPlane, reader: dict[str, Any]
) -> None:
    from kubernetes import client

    home, other = reader["home"], reader["other"]
    as_reader = client.CoreV1Api(control_plane.api_client(token=reader["token"]))

    names = {c.metadata.name for c in as_reader.list_namespaced_config_map(home).items}
    assert f"cfg-{home}" in names
    assert as_reader.read_namespaced_config_map(f"cfg-{home}", home).data == {"k": "v"}

    assert status_of(as_reader.list_namespaced_secret, home) == 403
    assert status_of(as_reader.read_namespaced_secret, "s", home) == 403
    assert status_of(as_reader.list_namespaced_config_map, other) == 403
    assert status_of(as_reader.list_config_map_for_all_namespaces) == 403
    assert status_of(as_reader.delete_namespaced_config_map, f"cfg-{home}", home) == 403
    # The admin still sees the other namespace: the refusal is RBAC, not a missing object.
    assert reader["core"].read_namespaced_config_map(f"cfg-{other}", other).data == {"k": "v"}


def test_kubectl_with_a_created_token(control_plane: ControlPlane, reader: dict[str, Any]) -> None:
    home, other = reader["home"], reader["other"]
    token = control_plane.kubectl(
        "create", "token", "reader", "-n", home, "--duration=10m"
    ).stdout.strip()
    as_reader = ("--token", token)

    whoami = control_plane.kubectl(
        *as_reader, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"
    ).stdout
    assert whoami == f"system:serviceaccount:{home}:reader"

    out = control_plane.kubectl(*as_reader, "get", "configmaps", "-n", home, "-o", "name").stdout
    assert f"configmap/cfg-{home}" in out.split()

    denied = control_plane.kubectl(*as_reader, "get", "configmaps", "-n", other, check=False)
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr
    assert (
        f'cannot list resource "configmaps" in API group "" in the namespace "{other}"'
        in denied.stderr
    )

    can_i = control_plane.kubectl(
        *as_reader, "auth", "can-i", "list", "secrets", "-n", home, check=False
    )
    assert can_i.stdout.strip() == "no"


def test_invalid_and_revoked_tokens_are_unauthorized(
    control_plane: ControlPlane, reader: dict[str, Any]
) -> None:
    from kubernetes import client

    home, token = reader["home"], reader["token"]
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert (
        status_of(
            client.CoreV1Api(control_plane.api_client(token=forged)).list_namespaced_config_map,
            home,
        )
        == 401
    )

    # A bound token dies with its service account.
    as_reader = client.CoreV1Api(control_plane.api_client(token=token))
    assert status_of(as_reader.list_namespaced_config_map, home) == 200
    reader["core"].delete_namespaced_service_account("reader", home)
    wait_until(
        lambda: status_of(as_reader.list_namespaced_config_map, home) == 401,
        timeout=30,
        what="the deleted service account's token to be rejected",
    )

"""The local node's pure rules (hack/localnode): env as a kubelet builds it, the command
line without images, the port mapping, the crash-loop back-off. The e2e tests run them
for real; these pin the corner cases."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from flowfleet import defaults

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "hack" / "localnode"))

from localnode import logserver, podspec
from localnode.container import Backoff

NODE = podspec.NodeResources(cpu=2, memory_bytes=4 * 1024**3)
POD = {
    "metadata": {"name": "w-1", "namespace": "ns", "uid": "u-1", "labels": {"app": "w"}},
    "spec": {"nodeName": "localnode"},
    "status": {"podIP": "127.0.0.1"},
}


class Lookups:
    def __init__(self) -> None:
        self.secrets = {"db": {"dsn": "postgresql://x@h/db"}}
        self.maps = {"tuning": {"batch": "20", "mode": "fast"}}

    def secret(self, namespace: str, name: str) -> dict[str, str] | None:
        return self.secrets.get(name)

    def config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        return self.maps.get(name)


def resolve(
    *env: dict[str, object], env_from: list[dict[str, object]] | None = None
) -> dict[str, str]:
    container = {"name": "c", "env": list(env), "envFrom": env_from or []}
    return podspec.resolve_env(POD, container, Lookups(), NODE)


def test_env_sources_resolve_in_order_with_expansion() -> None:
    env = resolve(
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
        {"name": "DSN", "valueFrom": {"secretKeyRef": {"name": "db", "key": "dsn"}}},
        {"name": "BATCH", "valueFrom": {"configMapKeyRef": {"name": "tuning", "key": "batch"}}},
        {"name": "GREETING", "value": "hi $(POD_NAME) $(UNKNOWN) $$(POD_NAME)"},
        {"name": "MODE", "value": "slow"},  # env wins over envFrom
        env_from=[{"configMapRef": {"name": "tuning"}, "prefix": ""}],
    )
    assert env["POD_NAME"] == "w-1" and env["APP"] == "w"
    assert env["DSN"] == "postgresql://x@h/db" and env["BATCH"] == "20"
    assert env["GREETING"] == "hi w-1 $(UNKNOWN) $(POD_NAME)"
    assert env["MODE"] == "slow"


def test_missing_references_wait_unless_optional() -> None:
    missing = {"name": "X", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k"}}}
    with pytest.raises(podspec.ConfigError, match='secret "nope" not found'):
        resolve(missing)
    no_key = {"name": "X", "valueFrom": {"configMapKeyRef": {"name": "tuning", "key": "k"}}}
    with pytest.raises(podspec.ConfigError, match="couldn't find key k"):
        resolve(no_key)
    optional = {
        "name": "X",
        "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k", "optional": True}},
    }
    assert "X" not in resolve(optional)


def test_resource_field_ref_falls_back_to_the_node() -> None:
    env = resolve(
        {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
        {
            "name": "MEM_MI",
            "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}},
        },
    )
    assert env == {"CPU": "2", "MEM_MI": "4096"}


def test_command_line_uses_this_checkouts_flowfleet() -> None:
    run = podspec.command_line
    assert run({"args": ["worker", "f"]}, {}, "/v/flowfleet", "/v/python") == [
        "/v/flowfleet",
        "worker",
        "f",
    ]
    assert run({"command": ["flowfleet"], "args": ["migrate"]}, {}, "/v/flowfleet", "/v/py") == [
        "/v/flowfleet",
        "migrate",
    ]
    assert run({"command": ["python3", "-c", "$(X)"]}, {"X": "1"}, "/v/ff", "/v/python")[:3] == [
        "/v/python",
        "-c",
        "1",
    ]


def test_worker_http_port_is_remapped_through_its_option() -> None:
    local = {8080: 31001, 9090: 31002}.__getitem__
    worker = ["/v/flowfleet", "worker", "f"]
    assert podspec.map_http_port(worker, {}, local)[-2:] == ["--http-port", "31001"]
    assert defaults.HTTP_PORT == podspec.WORKER_DEFAULT_HTTP_PORT
    from_env = podspec.map_http_port(worker, {"GLOBAL_WORKER_HTTP_PORT": "9090"}, local)
    assert from_env[-2:] == ["--http-port", "31002"]
    explicit = podspec.map_http_port([*worker, "--http-port", "9090", "-x"], {}, local)
    assert explicit == [*worker, "--http-port", "31002", "-x"]
    assert (
        podspec.map_http_port([*worker, "--http-port=9090"], {}, local)[-1] == "--http-port=31002"
    )
    off = [*worker, "--http-port", "0"]
    assert podspec.map_http_port(off, {}, local) == off
    assert podspec.map_http_port(["/v/flowfleet", "migrate"], {}, local) == [
        "/v/flowfleet",
        "migrate",
    ]


def test_probe_ports_by_name_or_number() -> None:
    container = {"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}
    assert podspec.container_port(container, "http") == 8080
    assert podspec.container_port(container, 9000) == 9000
    with pytest.raises(podspec.ConfigError, match="not declared"):
        podspec.container_port(container, "metrics")


def test_sidecar_init_containers_are_refused_plainly() -> None:
    sidecar = {"name": "s", "restartPolicy": "Always"}
    assert "sidecar" in (podspec.unsupported({"spec": {"initContainers": [sidecar]}}) or "")
    assert podspec.unsupported({"spec": {"initContainers": [{"name": "migrate"}]}}) is None
    assert podspec.unsupported(POD) is None


def test_backoff_is_a_kubelets() -> None:
    backoff = Backoff(base=10, cap=300)
    assert [backoff.delay(n) for n in range(1, 8)] == [0, 10, 20, 40, 80, 160, 300]


def test_kubectl_logs_shows_the_current_run_and_previous_the_one_before() -> None:
    text = b"---- localnode: starting\na\nb\n---- localnode: restarting\nc\n"
    assert logserver.runs(text) == [b"a\nb\n", b"c\n"]
    assert logserver.runs(b"no marker\n") == [b"no marker\n"]
    assert logserver.tail(b"1\n2\n3\n", 2, None) == b"2\n3\n"
    assert logserver.tail(b"1\n2\n3\n", 0, None) == b""
    assert logserver.tail(b"1\n2\n3\n", None, 3) == b"1\n2"

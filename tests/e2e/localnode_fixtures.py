"""Pods that really run: the local node agent (hack/localnode) against the session's
control plane, a throwaway PostgreSQL, and helpers for the end-to-end scenarios.

``local_node`` (session) registers one Node; from then on every pod the scheduler can
place runs as a local ``flowfleet`` process, for the rest of the session. A test that
needs pods to stay Pending must not run after it (or must pin them elsewhere with a
nodeSelector); a test that needs its own node (to stop it, say) starts one with
``start_local_node`` and pins its pods there with ``node_selector(node)``.

Helpers the operator scenarios can reuse: ``worker_deployment`` (a plain worker
Deployment reading its DSN from a Secret), ``dsn_secret``, ``wait_pods``,
``terminating_pods``, ``LocalNode.container_pid`` / ``local_port`` / ``log`` /
``processes``, ``migrated_database``.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from flowfleet.migrate import migrate
from flowfleet.throwaway import ThrowawayPostgres

from .conftest import REPO, ControlPlane, pid_alive, wait_until

NODE_SH = REPO / "hack" / "localnode" / "node.sh"
NODE_LABEL = "kubernetes.io/hostname"
# Pods restart after a crash at once, then after 1 s, 2 s, ...: a kubelet's 10 s would
# make every crash-loop test slow.
TEST_BACKOFF_BASE = "1"
_databases = itertools.count()


@dataclass
class LocalNode:
    name: str
    state_dir: Path
    kubeconfig: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            "KUBECONFIG": str(self.kubeconfig),
            "FLOWFLEET_NODE_NAME": self.name,
            "FLOWFLEET_NODE_DIR": str(self.state_dir),
        }

    @property
    def agent_pid(self) -> int | None:
        path = self.state_dir / "node.pid"
        return int(path.read_text()) if path.exists() else None

    def pod_dir(self, namespace: str, pod: str) -> Path:
        """The newest state dir of that pod (a pod dir is per uid)."""
        found = sorted(
            (self.state_dir / "pods").glob(f"{namespace}_{pod}_*"), key=lambda p: p.stat().st_mtime
        )
        if not found:
            raise FileNotFoundError(f"no state dir for pod {namespace}/{pod} in {self.state_dir}")
        return found[-1]

    def container_pid(self, namespace: str, pod: str, container: str = "worker") -> int | None:
        """The running process of a container, or None while it is not running."""
        path = self.pod_dir(namespace, pod) / f"{container}.pid"
        try:
            pid = int(path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def local_port(self, namespace: str, pod: str, container_port: int = 8080) -> int:
        """Where a pod's container port listens on this machine."""
        mapping = json.loads((self.pod_dir(namespace, pod) / "ports.json").read_text())
        return int(mapping[str(container_port)])

    def kill_container(
        self, namespace: str, pod: str, container: str = "worker", sig: int = signal.SIGKILL
    ) -> int:
        """A container crash: signal its process (the node restarts it); returns the pid."""
        pid = self.container_pid(namespace, pod, container)
        if pid is None:
            raise AssertionError(f"{namespace}/{pod}/{container} has no running process")
        os.kill(pid, sig)
        return pid

    def log(self, namespace: str, pod: str, container: str = "worker") -> str:
        return (self.pod_dir(namespace, pod) / f"{container}.log").read_text(errors="replace")

    def processes(self) -> list[int]:
        """Every live process working in this node's state dir: pod processes run with
        their pod's dir as cwd, so this finds them whether or not a pid file is left."""
        found = []
        root = str(self.state_dir)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            if (cwd == root or cwd.startswith(root + "/")) and pid_alive(int(entry.name)):
                found.append(int(entry.name))
        return found


def node_sh(node: LocalNode, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(NODE_SH), *args],
        env={**os.environ, **node.env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_local_node(
    control_plane: ControlPlane, state_dir: Path, name: str, extra_args: str = ""
) -> LocalNode:
    node = LocalNode(name=name, state_dir=state_dir.resolve(), kubeconfig=control_plane.kubeconfig)
    env_args = f"--backoff-base {TEST_BACKOFF_BASE} {extra_args}".strip()
    proc = subprocess.run(
        ["bash", str(NODE_SH), "start"],
        env={**os.environ, **node.env, "FLOWFLEET_NODE_ARGS": env_args},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"node.sh start failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return node


def stop_local_node(node: LocalNode) -> None:
    """Stop the agent; it must leave no process of its pods behind."""
    proc = node_sh(node, "stop")
    assert proc.returncode == 0, proc.stderr
    left = node.processes()
    for pid in left:  # never leak into the next test, but fail this one
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes outlived the node agent: {left}"


@pytest.fixture(scope="session")
def local_node(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalNode]:
    node = start_local_node(control_plane, tmp_path_factory.mktemp("localnode"), "localnode")
    try:
        yield node
    finally:
        stop_local_node(node)


@pytest.fixture(scope="session")
def localnode_pg() -> Iterator[ThrowawayPostgres]:
    with ThrowawayPostgres() as server:
        yield server


def migrated_database(server: ThrowawayPostgres) -> str:
    """A fresh database with the queue schema; returns its DSN."""
    name = f"e2e_{os.getpid()}_{next(_databases)}"
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    dsn = server.dsn(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrate(conn)
    return dsn


def restart_postgres(server: ThrowawayPostgres) -> None:
    """Restart the server in place (fast shutdown: every connection is cut), same data,
    same port: the outage the workers must ride out."""
    cmd = [str(server.bindir / "pg_ctl"), "-D", str(server.datadir), "-m", "fast", "-w"]
    # -l: the new postmaster must not inherit our stdout (a pipe would never close).
    cmd += ["-t", "60", "-l", str(server.root / "server.log"), "restart"]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    subprocess.run(
        cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=90
    )


# ------------------------------------------------------------- manifests ----


def dsn_secret(name: str, dsn: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "stringData": {"dsn": dsn},
    }


def node_selector(node: LocalNode) -> dict[str, str]:
    return {NODE_LABEL: node.name}


def worker_deployment(
    name: str,
    flow: str,
    entrypoint: str,
    secret: str,
    replicas: int,
    *,
    node: LocalNode | None = None,
    worker_args: tuple[str, ...] = (),
    env: tuple[dict[str, Any], ...] = (),
    grace_seconds: int = 30,
) -> dict[str, Any]:
    """A plain-runner worker Deployment as a user writes one: DSN from a Secret, the pod
    name as instance id (downward API), probes on the worker's HTTP port."""
    labels = {"app": name}
    container = {
        "name": "worker",
        "image": "flowfleet:dev",
        "args": ["worker", flow, "--entrypoint", entrypoint, "--runner", "plain", *worker_args],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {
                "name": "FLOWFLEET_DSN",
                "valueFrom": {"secretKeyRef": {"name": secret, "key": "dsn"}},
            },
            *env,
        ],
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 1},
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "http"},
            "periodSeconds": 2,
            "failureThreshold": 3,
        },
    }
    spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": grace_seconds,
        "automountServiceAccountToken": False,
        "containers": [container],
    }
    if node is not None:
        spec["nodeSelector"] = node_selector(node)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": spec},
        },
    }


# --------------------------------------------------------------- waiting ----


def _ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def wait_pods(
    core: Any,
    namespace: str,
    selector: str,
    count: int,
    *,
    ready: bool = True,
    timeout: float = 60,
) -> list[Any]:
    """Wait for exactly ``count`` live (not terminating) pods, Running and, by default,
    Ready; returns them sorted by name."""

    def check() -> list[Any] | None:
        pods = [
            p
            for p in core.list_namespaced_pod(namespace, label_selector=selector).items
            if p.metadata.deletion_timestamp is None
        ]
        good = [p for p in pods if p.status.phase == "Running" and (_ready(p) or not ready)]
        if len(pods) == count and len(good) == count:
            return sorted(pods, key=lambda p: p.metadata.name)
        return None

    return list(
        wait_until(check, timeout=timeout, interval=0.2, what=f"{count} running pods {selector}")
    )


def terminating_pods(core: Any, namespace: str) -> list[str]:
    return [
        p.metadata.name
        for p in core.list_namespaced_pod(namespace).items
        if p.metadata.deletion_timestamp is not None
    ]


def wait_gone(core: Any, namespace: str, name: str, uid: str, timeout: float = 60) -> None:
    """Until no pod of that uid exists (a replacement may take the name)."""
    from kubernetes.client.rest import ApiException

    def gone() -> bool:
        try:
            pod = core.read_namespaced_pod(name, namespace)
        except ApiException as exc:
            return exc.status == 404
        return bool(pod.metadata.uid != uid)

    wait_until(gone, timeout=timeout, interval=0.2, what=f"pod {namespace}/{name} gone")


def wait_dead(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} still alive after {timeout}s")
        time.sleep(0.05)

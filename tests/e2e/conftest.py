"""End-to-end fixtures: a real Kubernetes control plane (etcd, kube-apiserver,
kube-controller-manager, kube-scheduler) started by hack/controlplane/cluster.sh.

The cluster lives in a temporary state dir of its own (FLOWFLEET_CLUSTER_DIR), so
it never touches a developer's `make cluster-up` cluster, and is stopped at the
end of the session. The only reason to skip is a machine that has neither a Go
toolchain nor the cached binaries.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# Helm and the chart's operator kubeconfig (fixtures and the hook that builds helm).
from .chart_fixtures import chart_operator_kubeconfig, helm, pytest_runtestloop  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = REPO / "hack" / "controlplane" / "cluster.sh"
CRD_FILE = REPO / "crds" / "distributedflow.yaml"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")

# A cold build compiles Kubernetes: far longer than any per-test timeout.
BUILD_TIMEOUT_S = 3600
UP_TIMEOUT_S = 300


def cluster_sh(
    *args: str, env: dict[str, str] | None = None, timeout: float = UP_TIMEOUT_S, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(CLUSTER_SH), *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
    )


def binaries_cached() -> bool:
    return cluster_sh("cached", check=False, timeout=30).returncode == 0


def skip_reason() -> str | None:
    if shutil.which("go") is None and not binaries_cached():
        cache = cluster_sh("cache-dir", timeout=30).stdout.strip()
        return (
            f"no Go toolchain on PATH to build the control plane, and no cached binaries in {cache}"
        )
    return None


def pid_alive(pid: int) -> bool:
    """True if pid is a live process (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state is the field after the parenthesised command name.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 60,
    interval: float = 0.25,
    what: str = "condition",
) -> Any:
    """Poll predicate until it returns something truthy; return that value."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # keep polling through transient API errors
            last_exc = exc
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}"
                + (f" (last error: {last_exc!r})" if last_exc else "")
            )
        time.sleep(interval)


@dataclass
class ControlPlane:
    state_dir: Path
    kubectl_bin: str
    _clients: list[Any] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {"FLOWFLEET_CLUSTER_DIR": str(self.state_dir)}

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def server(self) -> str:
        return (self.state_dir / "server").read_text().strip()

    @property
    def ca_cert(self) -> Path:
        return self.state_dir / "pki" / "ca.crt"

    def pids(self) -> dict[str, int]:
        return {c: int((self.state_dir / f"{c}.pid").read_text()) for c in COMPONENTS}

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster; output is text."""
        proc = subprocess.run(
            [
                self.kubectl_bin,
                f"--kubeconfig={self.kubeconfig}",
                f"--cache-dir={self.state_dir / 'kubectl-cache'}",
                *args,
            ],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({proc.returncode}):\n"
                f"{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def api_client(self, token: str | None = None) -> Any:
        """A kubernetes.client.ApiClient: admin by default, or for a bearer token."""
        from kubernetes import client, config

        if token is None:
            api = config.new_client_from_config(config_file=str(self.kubeconfig))
        else:
            cfg = client.Configuration()
            cfg.host = self.server
            cfg.ssl_ca_cert = str(self.ca_cert)
            cfg.api_key = {"authorization": token}
            cfg.api_key_prefix = {"authorization": "Bearer"}
            api = client.ApiClient(cfg)
        self._clients.append(api)
        return api

    def close(self) -> None:
        for api in self._clients:
            api.close()
        self._clients.clear()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Everything under tests/e2e needs the control plane.
    for item in items:
        if item.path.is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.e2e)


def pytest_collection_finish(session: pytest.Session) -> None:
    # Build here, outside any test: pytest-timeout would count a cold build
    # (many minutes) against the first test that uses the fixture.
    if session.config.option.collectonly:
        return
    if not any(item.get_closest_marker("e2e") for item in session.items):
        return
    if shutil.which("go") is None or binaries_cached():
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(
            "e2e: building the Kubernetes control plane "
            "(hack/controlplane/cluster.sh build); a cold build takes minutes"
        )
    started = time.monotonic()
    proc = cluster_sh("build", timeout=BUILD_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        # Not fatal to the session (unit tests still run): the fixture's `up`
        # tries again and the e2e tests error with its message.
        if reporter is not None:
            reporter.write_line(f"e2e: cluster.sh build failed:\n{proc.stderr[-4000:]}")
        return
    if reporter is not None:
        reporter.write_line(f"e2e: control plane built in {time.monotonic() - started:.0f}s")


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    state_dir = tmp_path_factory.mktemp("cluster").resolve()  # cluster.sh resolves it too
    env = {"FLOWFLEET_CLUSTER_DIR": str(state_dir)}
    up = cluster_sh("up", env=env, timeout=BUILD_TIMEOUT_S, check=False)
    if up.returncode != 0:
        cluster_sh("down", env=env, check=False)  # whatever half-started
        raise RuntimeError(f"cluster.sh up failed ({up.returncode}):\n{up.stderr[-4000:]}")
    assert up.stdout.strip() == f"export KUBECONFIG={state_dir / 'kubeconfig'}"
    cp = ControlPlane(
        state_dir=state_dir, kubectl_bin=cluster_sh("kubectl-path", env=env).stdout.strip()
    )
    pids = cp.pids()
    try:
        yield cp
    finally:
        cp.close()
        down = cluster_sh("down", env=env, check=False)
    assert down.returncode == 0, down.stderr
    # `down` must leave nothing of ours behind.
    assert not [c for c, pid in pids.items() if pid_alive(pid)], f"still running: {pids}"
    assert not state_dir.exists()


@pytest.fixture(scope="session")
def api(control_plane: ControlPlane) -> Any:
    """Admin ApiClient for the session's cluster."""
    return control_plane.api_client()


def delete_namespace(core: Any, name: str) -> None:
    from kubernetes.client.rest import ApiException

    try:
        core.delete_namespace(name)
    except ApiException as exc:
        if exc.status != 404:  # a test may have deleted it already
            raise


@pytest.fixture
def namespace(control_plane: ControlPlane, api: Any) -> Iterator[str]:
    """A fresh namespace, ready for pods (its default service account exists)."""
    from kubernetes import client

    name = f"e2e-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    # The serviceaccount controller creates `default`; pods cannot be admitted before.
    wait_until(
        lambda: core.read_namespaced_service_account("default", name),
        timeout=60,
        what=f"service account default in {name}",
    )
    yield name
    delete_namespace(core, name)


@pytest.fixture
def make_namespace(api: Any) -> Iterator[Callable[[], str]]:
    """Factory for extra fresh namespaces, deleted at the end of the test."""
    from kubernetes import client

    core = client.CoreV1Api(api)
    created: list[str] = []

    def make() -> str:
        name = f"e2e-{uuid.uuid4().hex[:8]}"
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
        created.append(name)
        return name

    yield make
    for name in created:
        delete_namespace(core, name)


# The local node (pods that really run) and its helpers live beside this file.
from .localnode_fixtures import local_node, localnode_pg  # noqa: E402, F401
from .loop_fixtures import loop, loop_prefect  # noqa: E402, F401  (the whole-loop scenarios)
from .operator_fixtures import *  # noqa: E402, F403  (the operator tests' fixtures)

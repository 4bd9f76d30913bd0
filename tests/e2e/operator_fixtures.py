"""Fixtures for the operator's end-to-end tests: the CRD installed, a real PostgreSQL that
checks passwords, and `flowfleet operator` running as a process against the control plane.

`operator_kubeconfig` is the one place that says which identity the operator runs as:
admin here; at merge it points at the chart's ServiceAccount token
(`chart_operator_kubeconfig`), so the same tests prove the chart's RBAC.
"""

from __future__ import annotations

import base64
import itertools
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from flowfleet.throwaway import ThrowawayPostgres, free_port

from .conftest import CRD_FILE, REPO, ControlPlane, wait_until

__all__ = ["flowfleet_operator", "operator_crd", "operator_kubeconfig", "password_postgres"]

GROUP, VERSION, PLURAL = "flowfleet.io", "v1alpha1", "distributedflows"
APP_USER = "flowfleet_app"
# Never printed by anything under test: the tests grep for it in status, events and logs.
APP_PASSWORD = "Pw-e2e-7Qz9-unique"  # noqa: S105 - a throwaway server's test role
_databases = itertools.count()


@dataclass
class PasswordPostgres:
    """A throwaway server on which APP_USER must give APP_PASSWORD (scram), and which
    a test may stop and start again on the same port."""

    server: ThrowawayPostgres

    def dsn(self, dbname: str, password: str = APP_PASSWORD) -> str:
        return f"postgresql://{APP_USER}:{password}@127.0.0.1:{self.server.port}/{dbname}"

    def new_database(self) -> str:
        name = f"op_{os.getpid()}_{next(_databases)}"
        with psycopg.connect(self.server.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} OWNER {APP_USER}")
        return name

    def stop(self) -> None:
        self.server._run("pg_ctl", "-D", str(self.server.datadir), "-m", "fast", "-w", "stop")

    def start(self) -> None:
        options = (
            f"-p {self.server.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={self.server.root} -c timezone=UTC -c fsync=off"
        )
        log = str(self.server.root / "server.log")
        self.server._run(
            "pg_ctl", "-D", str(self.server.datadir), "-l", log, "-o", options, "-w", "start"
        )
        self.server.wait_ready()


@pytest.fixture(scope="session")
def password_postgres() -> Iterator[PasswordPostgres]:
    with ThrowawayPostgres() as server:
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}'")
        hba = server.datadir / "pg_hba.conf"
        # First match wins: the app user must authenticate; the superuser stays trusted.
        hba.write_text(f"host all {APP_USER} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        server._run("pg_ctl", "-D", str(server.datadir), "reload")
        yield PasswordPostgres(server)


@pytest.fixture(scope="session")
def operator_crd(control_plane: ControlPlane) -> None:
    control_plane.kubectl("apply", "-f", str(CRD_FILE))
    control_plane.kubectl(
        "wait",
        "--for=condition=Established",
        f"crd/{PLURAL}.{GROUP}",
        "--timeout=60s",
        timeout=90,
    )


@pytest.fixture(scope="session")
def operator_kubeconfig(chart_operator_kubeconfig: Path) -> Path:
    """The kubeconfig `flowfleet operator` runs with: a token of the Helm chart's operator
    ServiceAccount, so every operator test also proves the chart's RBAC is enough."""
    return chart_operator_kubeconfig


class OperatorProcess:
    """`flowfleet operator` as a user runs it, logging to a file the tests read."""

    def __init__(self, kubeconfig: Path, log_path: Path, prefect_api_url: str = "") -> None:
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.port = free_port()
        self.prefect_api_url = prefect_api_url
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "FLOWFLEET_OPERATOR_HTTP_PORT": str(self.port),
            "FLOWFLEET_OPERATOR_LOG_FORMAT": "json",
            "FLOWFLEET_OPERATOR_PREFECT_API_URL": self.prefect_api_url,
        }
        env.pop("KUBERNETES_SERVICE_HOST", None)
        flowfleet = Path(sys.executable).with_name("flowfleet")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(flowfleet), "operator"], env=env, stdout=log, stderr=log, cwd=REPO
            )
        wait_until(self.healthy, timeout=60, what="operator /healthz")

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"operator exited:\n{self.log()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# Module scope: the operator watches every namespace, and must not answer the
# DistributedFlows that other test modules create to test the CRD alone.
@pytest.fixture(scope="module")
def flowfleet_operator(
    operator_kubeconfig: Path, operator_crd: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    op = OperatorProcess(operator_kubeconfig, tmp_path_factory.mktemp("operator") / "operator.log")
    op.start()
    yield op
    op.stop()


def make_secret(api: Any, namespace: str, name: str, data: dict[str, str]) -> None:
    from kubernetes import client

    client.CoreV1Api(api).create_namespaced_secret(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        },
    )

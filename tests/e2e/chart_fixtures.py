"""Helm and the flowfleet chart on the session's control plane.

- `helm`: the helm that hack/helm/helm.sh builds from its Go module (cached outside the
  repo), run with its own config/cache/data dirs and the control plane's kubeconfig.
- `chart_operator_kubeconfig`: installs charts/flowfleet in a namespace of its own and
  returns a kubeconfig that authenticates as the chart's operator ServiceAccount (a bound
  token from the TokenRequest API), so the operator runs with exactly the chart's RBAC.

Registered from tests/e2e/conftest.py by import. The hook below builds helm, when missing,
before the first test, so a cold build (minutes) never counts against a test's timeout.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # conftest imports this module: no import back at run time
    from .conftest import ControlPlane

REPO = Path(__file__).resolve().parents[2]
# A cold helm build takes minutes: far longer than any per-test timeout.
BUILD_TIMEOUT_S = 3600
HELM_SH = REPO / "hack" / "helm" / "helm.sh"
CHART = REPO / "charts" / "flowfleet"
# The fixture's release: its ServiceAccount is <release>-operator, as the chart names it.
OPERATOR_RELEASE = "flowfleet"
OPERATOR_NAMESPACE = "flowfleet-system"
OPERATOR_SERVICE_ACCOUNT = f"{OPERATOR_RELEASE}-operator"
# Long enough for any session; the API server signs it, it dies with the ServiceAccount.
TOKEN_SECONDS = 6 * 3600
HELM_FIXTURES = ("helm", "chart_operator_kubeconfig")


def helm_sh(
    *args: str, timeout: float = 60, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(HELM_SH), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
    )


def helm_cached() -> bool:
    return helm_sh("cached", check=False).returncode == 0


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> None:
    # After collection (and the control plane's build in conftest), before any test.
    if session.config.option.collectonly or shutil.which("go") is None or helm_cached():
        return
    if not any(set(HELM_FIXTURES) & set(getattr(i, "fixturenames", ())) for i in session.items):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("e2e: building helm (hack/helm/helm.sh build); cold: minutes")
    started = time.monotonic()
    proc = helm_sh("build", timeout=BUILD_TIMEOUT_S, check=False)
    if reporter is not None:
        # Not fatal here: the `helm` fixture tries again and errors with the message.
        outcome = "built" if proc.returncode == 0 else f"build failed:\n{proc.stderr[-4000:]}"
        reporter.write_line(f"e2e: helm {outcome} ({time.monotonic() - started:.0f}s)")


@dataclass
class Helm:
    binary: str
    control_plane: ControlPlane
    home: Path

    @property
    def env(self) -> dict[str, str]:
        # Own dirs: never read or write the developer's ~/.config/helm (repositories, plugins).
        return {
            **os.environ,
            "HELM_CONFIG_HOME": str(self.home / "config"),
            "HELM_CACHE_HOME": str(self.home / "cache"),
            "HELM_DATA_HOME": str(self.home / "data"),
            "KUBECONFIG": str(self.control_plane.kubeconfig),
        }

    def run(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.binary, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def template(self, *args: str, release: str = "ff", namespace: str = "flowfleet") -> str:
        return self.run("template", release, str(CHART), "--namespace", namespace, *args).stdout


@pytest.fixture(scope="session")
def helm(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    if shutil.which("go") is None and not helm_cached():
        pytest.skip("no Go toolchain on PATH to build helm, and no cached helm")
    binary = helm_sh("path", timeout=BUILD_TIMEOUT_S).stdout.strip()
    return Helm(binary=binary, control_plane=control_plane, home=tmp_path_factory.mktemp("helm"))


def service_account_token(control_plane: ControlPlane, namespace: str, name: str) -> str:
    """A bound token for the ServiceAccount, from the TokenRequest API."""
    from kubernetes import client

    core = client.CoreV1Api(control_plane.api_client())
    # The client's models are typed Optional throughout; a missing token fails below.
    request: Any = core.create_namespaced_service_account_token(
        name,
        namespace,
        client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=TOKEN_SECONDS)
        ),
    )
    token: str = request.status.token
    assert token.count(".") == 2, "TokenRequest returned no signed token"
    return token


def write_token_kubeconfig(
    path: Path, control_plane: ControlPlane, token: str, user: str, namespace: str = "default"
) -> Path:
    """A kubeconfig for the control plane's server and CA that authenticates by token."""
    ca = base64.b64encode(control_plane.ca_cert.read_bytes()).decode()
    path.write_text(
        "apiVersion: v1\n"
        "kind: Config\n"
        "clusters:\n"
        "- name: flowfleet\n"
        "  cluster:\n"
        f"    server: {control_plane.server}\n"
        f"    certificate-authority-data: {ca}\n"
        "users:\n"
        f"- name: {user}\n"
        "  user:\n"
        f"    token: {token}\n"
        "contexts:\n"
        "- name: flowfleet\n"
        "  context:\n"
        "    cluster: flowfleet\n"
        f"    user: {user}\n"
        f"    namespace: {namespace}\n"
        "current-context: flowfleet\n"
    )
    path.chmod(0o600)  # it holds a credential
    return path


@pytest.fixture(scope="session")
def chart_operator_kubeconfig(
    control_plane: ControlPlane, helm: Helm, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """Kubeconfig of the chart's operator ServiceAccount (cluster-wide install)."""
    helm.run(
        "install", OPERATOR_RELEASE, str(CHART),
        "--namespace", OPERATOR_NAMESPACE, "--create-namespace",
        # The tests run the operator themselves under this identity; the chart's own
        # operator pod must never be scheduled (the local node would run it), or two
        # operators would fight over every DistributedFlow.
        "--set-string", "nodeSelector.flowfleet\\.io/e2e-unschedulable=true",
    )  # fmt: skip
    token = service_account_token(control_plane, OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT)
    user = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SERVICE_ACCOUNT}"
    path = tmp_path_factory.mktemp("operator") / "kubeconfig"
    yield write_token_kubeconfig(path, control_plane, token, user)
    helm.run("uninstall", OPERATOR_RELEASE, "--namespace", OPERATOR_NAMESPACE, check=False)

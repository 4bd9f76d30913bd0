"""hack/controlplane/cluster.sh itself: `up` is idempotent and recovers from a
dead component, `down` stops exactly its own processes and removes its state.

Runs a second cluster in a state dir of its own (own ports, own pids), so the
session's cluster is untouched, which the last test checks too."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import COMPONENTS, ControlPlane, cluster_sh, pid_alive, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def second(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ControlPlane]:
    state = tmp_path_factory.mktemp("second-cluster").resolve()
    env = {"FLOWFLEET_CLUSTER_DIR": str(state)}
    started = time.monotonic()
    up = cluster_sh("up", env=env, check=False)
    assert up.returncode == 0, up.stderr
    print(f"second cluster up in {time.monotonic() - started:.1f}s")
    try:
        yield ControlPlane(state_dir=state, kubectl_bin=control_plane.kubectl_bin)
    finally:
        cluster_sh("down", env=env, check=False)  # no-op if a test already did it


def test_clusters_are_independent(control_plane: ControlPlane, second: ControlPlane) -> None:
    assert second.server != control_plane.server
    assert set(second.pids().values()).isdisjoint(control_plane.pids().values())
    for cp in (control_plane, second):
        out = cp.kubectl("get", "--raw", "/readyz").stdout
        assert out == "ok"
    # Separate etcds: an object in one is not in the other.
    control_plane.kubectl("create", "configmap", "only-in-first", "-n", "default")
    assert (
        second.kubectl("get", "configmap", "only-in-first", "-n", "default", check=False).returncode
        != 0
    )


def test_up_is_idempotent(second: ControlPlane) -> None:
    before = second.pids()
    kubeconfig = second.kubeconfig.read_text()
    started = time.monotonic()
    up = cluster_sh("up", env=second.env)
    assert time.monotonic() - started < 10
    assert "already up" in up.stderr
    assert up.stdout.strip() == f"export KUBECONFIG={second.kubeconfig}"
    assert second.pids() == before
    assert second.kubeconfig.read_text() == kubeconfig
    assert cluster_sh("env", env=second.env).stdout.strip() == up.stdout.strip()
    assert cluster_sh("status", env=second.env, check=False).returncode == 0


def test_up_recovers_from_a_dead_apiserver(second: ControlPlane) -> None:
    import os

    before = second.pids()
    os.kill(before["kube-apiserver"], signal.SIGKILL)
    wait_until(
        lambda: not pid_alive(before["kube-apiserver"]),
        timeout=10,
        what="the killed apiserver to exit",
    )
    assert cluster_sh("status", env=second.env, check=False).returncode != 0

    up = cluster_sh("up", env=second.env)
    after = second.pids()
    # A fresh cluster: the survivors of the old one were stopped, not leaked.
    assert not [c for c, pid in before.items() if pid_alive(pid)]
    assert all(pid_alive(pid) for pid in after.values())
    assert up.stdout.strip() == f"export KUBECONFIG={second.kubeconfig}"
    assert second.kubectl("get", "--raw", "/readyz").stdout == "ok"


def test_down_stops_exactly_its_processes(
    control_plane: ControlPlane, second: ControlPlane
) -> None:
    pids = second.pids()
    assert set(pids) == set(COMPONENTS)
    assert all(pid_alive(pid) for pid in pids.values())
    # Each pid really is the component (not a wrapper shell).
    for component, pid in pids.items():
        assert Path(f"/proc/{pid}/exe").resolve().name == component
    session_pids = control_plane.pids()

    down = cluster_sh("down", env=second.env)
    assert "removed" in down.stderr
    assert not [c for c, pid in pids.items() if pid_alive(pid)]
    assert not second.state_dir.exists()
    # `down` again is a harmless no-op.
    assert cluster_sh("down", env=second.env).returncode == 0

    # The session's cluster is untouched.
    assert all(pid_alive(pid) for pid in session_pids.values())
    assert control_plane.kubectl("get", "--raw", "/readyz").stdout == "ok"

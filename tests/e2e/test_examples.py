"""The shipped Kubernetes example must be accepted by a real API server as written."""

from __future__ import annotations

from pathlib import Path

import yaml

from .conftest import ControlPlane

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "kubernetes" / "worker.yaml"


def test_worker_example_passes_server_side_dry_run(
    control_plane: ControlPlane, namespace: str
) -> None:
    out = control_plane.kubectl(
        "apply", "--dry-run=server", "-n", namespace, "-f", str(EXAMPLE)
    ).stdout
    assert "job.batch/survey-processor-migrate created (server dry run)" in out
    assert "deployment.apps/survey-processor created (server dry run)" in out


def test_worker_example_keeps_secrets_by_reference_and_runs_as_non_root() -> None:
    for doc in yaml.safe_load_all(EXAMPLE.read_text()):
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert isinstance(pod["securityContext"]["runAsUser"], int)
        for container in pod["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            secret = env["RPA_DB_CONNECTION_STRING"]
            assert "value" not in secret and "secretKeyRef" in secret["valueFrom"]
            assert container["securityContext"]["allowPrivilegeEscalation"] is False

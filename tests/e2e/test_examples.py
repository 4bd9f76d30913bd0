"""The shipped Kubernetes example: accepted by a real API server as written, applied in
one go with nothing to run first, and its pods' commands start cleanly in the order a
kubelet runs them (init container, then worker) while the database comes up late."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import yaml

from flowfleet.database import DatabaseManager
from flowfleet.distributed import DistributedProcessor
from flowfleet.throwaway import ThrowawayPostgres, free_port

from .conftest import ControlPlane

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "kubernetes"
EXAMPLE = EXAMPLES / "worker.yaml"
POSTGRES_DEV = EXAMPLES / "postgres-dev.yaml"
CRD = Path(__file__).resolve().parents[2] / "crds" / "distributedflow.yaml"
FLOWFLEET = str(Path(sys.executable).with_name("flowfleet"))


def docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def worker_pod() -> dict[str, Any]:
    (deployment,) = [d for d in docs(EXAMPLE) if d["kind"] == "Deployment"]
    return dict(deployment["spec"]["template"]["spec"])


def test_worker_example_passes_server_side_dry_run(
    control_plane: ControlPlane, namespace: str
) -> None:
    out = control_plane.kubectl(
        "apply", "--dry-run=server", "-n", namespace, "-f", str(EXAMPLE)
    ).stdout
    assert out.strip() == "deployment.apps/survey-processor created (server dry run)"


def test_example_with_the_dev_postgres_applies_in_one_go(
    control_plane: ControlPlane, namespace: str
) -> None:
    # For real, not a dry run: the Secret the workers read must exist when they are created.
    out = control_plane.kubectl(
        "apply", "-n", namespace, "-f", str(POSTGRES_DEV), "-f", str(EXAMPLE)
    ).stdout
    assert set(out.strip().splitlines()) == {
        "secret/rpa-db-secret created",
        "service/postgres created",
        "deployment.apps/postgres created",
        "deployment.apps/survey-processor created",
    }


def test_worker_example_keeps_secrets_by_reference_and_runs_as_non_root() -> None:
    pod = worker_pod()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert isinstance(pod["securityContext"]["runAsUser"], int)
    for container in pod["initContainers"] + pod["containers"]:
        env = {e["name"]: e for e in container.get("env", [])}
        secret = env["RPA_DB_CONNECTION_STRING"]
        assert "value" not in secret and "secretKeyRef" in secret["valueFrom"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_workers_start_only_after_the_schema_is_there() -> None:
    pod = worker_pod()
    (init,) = pod["initContainers"]
    assert init["args"][:2] == ["migrate", "--db"] and "--wait" in init["args"]
    assert not [d for d in docs(EXAMPLE) if d["kind"] == "Job"]  # nothing to apply first


def test_the_examples_flow_name_is_valid_for_the_crd_and_the_cli() -> None:
    crd = yaml.safe_load(CRD.read_text())
    pattern = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]["flowName"]["pattern"]
    flow = worker_pod()["containers"][0]["args"][1]
    assert re.fullmatch(pattern, flow)
    from flowfleet.cli import FLOW_NAME

    assert FLOW_NAME.pattern == pattern


def test_the_pods_commands_start_cleanly_on_a_late_database(tmp_path: Path) -> None:
    """What the kubelet would run, here as processes: the init container's command while
    the database does not exist yet, then the worker's, both exactly as the manifest says
    (the Secret's value becomes a throwaway PostgreSQL's connection string)."""
    pod = worker_pod()
    (init,) = pod["initContainers"]
    (worker,) = pod["containers"]
    port = free_port()

    def env_of(container: dict[str, Any], dsn: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWFLEET", "PREFECT"))}
        for item in container["env"]:
            if "value" in item:
                env[item["name"]] = item["value"]
            elif "secretKeyRef" in item["valueFrom"]:
                env[item["name"]] = dsn
            else:
                env[item["name"]] = "survey-processor-abc12"  # the downward API's pod name
        # Port 8080 may be taken on a shared machine; the settings' env name moves it.
        env["PRODUCTION_GLOBAL_WORKER_HTTP_PORT"] = str(port)
        return env

    with ThrowawayPostgres() as pg:
        dsn = pg.dsn("rpa_db")
        migrator = subprocess.Popen(
            [FLOWFLEET, *init["args"]], env=env_of(init, dsn), stderr=subprocess.PIPE, text=True
        )
        time.sleep(2)
        assert migrator.poll() is None  # waiting for the database, not crashed
        with psycopg.connect(pg.dsn(), autocommit=True) as admin:
            admin.execute("CREATE DATABASE rpa_db")
        _, err = migrator.communicate(timeout=60)
        assert migrator.returncode == 0, err

        db = DatabaseManager("example", connection_string=dsn)
        DistributedProcessor(db).add_records_to_queue(
            "survey_processor", [{"survey_id": f"S{i}"} for i in range(20)]
        )
        running = subprocess.Popen(
            [FLOWFLEET, *worker["args"]],
            env=env_of(worker, dsn),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while (
                DistributedProcessor(db).get_queue_status("survey_processor")["completed_records"]
                < 20
            ):
                assert running.poll() is None, running.communicate()[1]
                assert time.monotonic() < deadline, "records not processed"
                time.sleep(0.2)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as ready:
                assert ready.status == 200
        finally:
            running.send_signal(signal.SIGTERM)
            _, err = running.communicate(timeout=60)
            db.close()
        assert running.returncode == 0, err

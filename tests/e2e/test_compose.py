"""examples/docker-compose/compose.yaml, loaded by a real Compose implementation
(Debian's docker-compose; `config` needs no container engine), and its services'
commands run as written against a real PostgreSQL: the example works for flowfleet,
not just for a YAML parser."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from flowfleet.throwaway import ThrowawayPostgres

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "examples" / "docker-compose" / "compose.yaml"
FLOWFLEET = str(Path(sys.executable).parent / "flowfleet")
PASSWORD = "not-in-any-file"  # noqa: S105 - a test value, checked absent from the file


def docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        # Never a skip: the loader installs from Debian's packages on any machine this
        # suite runs on, and .ci/run installs it.
        pytest.fail("docker-compose missing: apt-get install docker-compose (.ci/run does)")
    return found


def compose_config(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    empty_env_file = tmp_path / "empty.env"  # a .env beside the example must not leak in
    empty_env_file.write_text("")
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("POSTGRES_PASSWORD", "RPA_DB_CONNECTION_STRING")
    }
    return subprocess.run(
        [docker_compose(), "--env-file", str(empty_env_file), "-f", str(COMPOSE), "config"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def config(tmp_path: Path) -> dict[str, Any]:
    done = compose_config(tmp_path, {"POSTGRES_PASSWORD": PASSWORD})
    assert done.returncode == 0, done.stderr
    loaded: dict[str, Any] = yaml.safe_load(done.stdout)
    return loaded


def test_compose_file_loads_as_the_seed_describes(config: dict[str, Any]) -> None:
    services = config["services"]
    assert set(services) == {"postgres", "migrate", "rpa-processor"}
    assert services["postgres"]["image"] == "postgres:15"
    assert services["postgres"]["volumes"][0].startswith("postgres_data:/var/lib/postgresql/data")
    assert "postgres_data" in config["volumes"]
    worker = services["rpa-processor"]
    assert worker["deploy"]["replicas"] == 3
    assert worker["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["migrate"]["command"][0] == "migrate"
    for name in ("migrate", "rpa-processor"):
        env = services[name]["environment"]
        # The DSN comes from the environment and carries no password; libpq takes it
        # from PGPASSWORD, filled from the same variable as the server's.
        assert env["RPA_DB_CONNECTION_STRING"] == "postgresql://rpa_user@postgres:5432/rpa_db"
        assert env["PGPASSWORD"] == PASSWORD
        assert env["PREFECT_ENVIRONMENT"] == "production"
    # As written (before interpolation), every password is a reference to the environment.
    raw = yaml.safe_load(COMPOSE.read_text())
    assert raw["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${")
    assert raw["x-queue-env"]["PGPASSWORD"].startswith("${POSTGRES_PASSWORD")


def test_compose_refuses_to_start_without_a_password(tmp_path: Path) -> None:
    done = compose_config(tmp_path, {})
    assert done.returncode != 0
    assert "set POSTGRES_PASSWORD" in done.stderr


def test_connection_string_comes_from_the_environment(tmp_path: Path) -> None:
    own = "postgresql://me@db.example:5432/queue"
    done = compose_config(
        tmp_path, {"POSTGRES_PASSWORD": PASSWORD, "RPA_DB_CONNECTION_STRING": own}
    )
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert services["rpa-processor"]["environment"]["RPA_DB_CONNECTION_STRING"] == own


def test_services_commands_run_as_written(config: dict[str, Any]) -> None:
    """migrate, then the worker's exact command (plus --exit-when-empty), against a real
    PostgreSQL standing in for the postgres service."""
    services = config["services"]
    with ThrowawayPostgres() as server:
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute("CREATE ROLE rpa_user LOGIN")
            conn.execute("CREATE DATABASE rpa_db OWNER rpa_user")

        def run(
            service: str, *extra: str, stdin: str | None = None
        ) -> subprocess.CompletedProcess[str]:
            env = {
                **services[service]["environment"],
                "RPA_DB_CONNECTION_STRING": f"postgresql://rpa_user@127.0.0.1:{server.port}/rpa_db",
                "PATH": os.environ["PATH"],
            }
            # The image's entrypoint is flowfleet (Dockerfile); here it is this checkout's.
            return subprocess.run(
                [FLOWFLEET, *services[service]["command"], *extra],
                env=env,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )

        migrated = run("migrate")
        assert migrated.returncode == 0, migrated.stderr
        assert "schema" in migrated.stdout
        records = "".join(f'{{"survey_id": {n}}}\n' for n in range(40))
        enqueue = subprocess.run(
            [FLOWFLEET, "enqueue", "survey_processor", "--db", "rpa_db", "-"],
            env={
                "RPA_DB_CONNECTION_STRING": f"postgresql://rpa_user@127.0.0.1:{server.port}/rpa_db",
                "PATH": os.environ["PATH"],
            },
            input=records,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert enqueue.returncode == 0, enqueue.stderr
        worker = run(
            "rpa-processor", "--exit-when-empty", "--http-port", "0", "--poll-seconds", "0.2"
        )
        assert worker.returncode == 0, worker.stderr[-3000:]
        with psycopg.connect(server.dsn("rpa_db"), autocommit=True) as conn:
            done = conn.execute(
                "SELECT count(*) FROM processing_history WHERE status = 'completed'"
            ).fetchone()
            left = conn.execute("SELECT count(*) FROM processing_queue").fetchone()
        assert done == (40,) and left == (0,)

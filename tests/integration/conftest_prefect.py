"""One real Prefect server per test session, for the tests of the Prefect runner.

Imported by the test modules that need it (``from conftest_prefect import
prefect_api_fixture``), so sessions that run no Prefect test never start one. The server
keeps its SQLite database in a temporary PREFECT_HOME; the test process talks to it
through ``temporary_settings``, worker subprocesses through ``prefect_env``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from flowfleet.throwaway import free_port

START_TIMEOUT = 90.0


@dataclass(frozen=True)
class PrefectApi:
    url: str  # http://127.0.0.1:<port>/api
    client_home: Path  # PREFECT_HOME for clients (the test process and workers)

    def env(self) -> dict[str, str]:
        """What a worker subprocess needs to report to this server."""
        return {
            "PREFECT_API_URL": self.url,
            "PREFECT_HOME": str(self.client_home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:  # noqa: S310
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _drain_prefect_services() -> None:
    """Send this process's buffered Prefect logs and events while the server is still up:
    left for interpreter exit, they would retry against a stopped server for a minute."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        service.drain_all(timeout=15, at_exit=False)


@pytest.fixture(scope="session", name="prefect_api")
def prefect_api_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectApi]:
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    server_home = tmp_path_factory.mktemp("prefect-server")
    client_home = tmp_path_factory.mktemp("prefect-client")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(server_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
    )
    log = server_home / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("prefect")),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            # Its own process group, so teardown reaches any child it spawns.
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Prefect server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_HOME: client_home}):
            yield PrefectApi(url, client_home)
            _drain_prefect_services()
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(server.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            server.wait(5)

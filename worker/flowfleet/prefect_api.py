"""Which Prefect API a worker of the Prefect runner reports to, said in one line at
start-up, and whether that API answers (for /readyz).

With ``PREFECT_API_URL`` set (in the environment or the active Prefect profile) the worker
uses that server. Without it, Prefect itself would start a temporary server inside the
first flow run: seconds of silence, its output in another format, runs in a SQLite file
that several workers on one machine fight over. The worker starts that temporary server
itself instead, up front: on a loopback port, with a database of its own that is deleted
when the worker stops, and its output relayed into the worker's log.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

import httpx

from flowfleet.errors import FlowfleetError
from flowfleet.throwaway import free_port

log = logging.getLogger("flowfleet.worker")
server_log = logging.getLogger("prefect.server.temporary")

# What /readyz answers: (ok, one line saying why).
CheckResult = tuple[bool, str]

HOW_TO_POINT = (
    "set PREFECT_API_URL to a Prefect server's API (http://HOST:4200/api) or to Prefect Cloud"
)


def configured_url() -> str | None:
    """PREFECT_API_URL as Prefect resolves it (environment, then the active profile)."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return str(url) if url else None


def use_api_url(url: str) -> None:
    """Point this process's Prefect client at ``url`` (it read its settings at import)."""
    from prefect.context import refresh_global_settings_context

    os.environ["PREFECT_API_URL"] = url
    refresh_global_settings_context()


class TemporaryServer:
    """A Prefect server for this worker alone: ``start()`` returns its API URL once it
    answers; ``stop()`` ends it and deletes its database."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.home = Path(tempfile.mkdtemp(prefix="flowfleet-prefect-"))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, stopping: threading.Event, timeout: float = 120.0) -> str | None:
        """The server's API URL once it answers; None when a stop is requested first."""
        env = dict(os.environ)
        env.update(
            PREFECT_UI_ENABLED="0",
            PREFECT_SERVER_UI_ENABLED="0",
            PREFECT__SERVER_EPHEMERAL="1",
            PREFECT__SERVER_FINAL="1",
            PREFECT_SERVER_DATABASE_CONNECTION_URL=(
                f"sqlite+aiosqlite:///{self.home / 'prefect.db'}"
            ),
        )
        env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flowfleet.prefect_api",
                str(self.port),
                str(os.getpid()),
                str(self.home),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        atexit.register(self.stop)  # also when the worker stops before its first run
        assert self.process.stdout is not None
        relay_output(self.process.stdout)
        deadline = time.monotonic() + timeout
        while not answers(self.url, timeout=2.0)[0]:
            if stopping.is_set():
                self.stop()
                return None
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise FlowfleetError(
                    f"the temporary Prefect server did not start within {timeout:g}s "
                    f"(see its output above); {HOW_TO_POINT}"
                )
            time.sleep(0.2)
        return self.url

    def stop(self) -> None:
        atexit.unregister(self.stop)
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.home, ignore_errors=True)


def relay_output(stream: IO[bytes], quiet_seconds: float = 0.3) -> None:
    """Log what the server prints, in the worker's format: lines that come together (a
    traceback) as one entry named after its last line, the whole text in ``output``."""
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for raw in stream:
            lines.put(raw.decode("utf-8", "replace").rstrip())
        lines.put(None)

    def relay() -> None:
        chunk: list[str] = []
        while True:
            try:
                line = lines.get(timeout=quiet_seconds)
            except queue.Empty:
                line = ""
                if not chunk:
                    continue
            if line:
                chunk.append(line)
                continue
            if chunk:
                text = "\n".join(chunk)[-8000:]
                server_log.warning(
                    "temporary Prefect server: %s", chunk[-1].strip(), extra={"output": text}
                )
                chunk = []
            if line is None:
                return

    threading.Thread(target=read, name="prefect-server-output", daemon=True).start()
    threading.Thread(target=relay, name="prefect-server-relay", daemon=True).start()


def answers(url: str, timeout: float = 2.0) -> CheckResult:
    """Whether the Prefect API at ``url`` answers its health check."""
    headers = {}
    key = os.environ.get("PREFECT_API_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        response = httpx.get(f"{url.rstrip('/')}/health", timeout=timeout, headers=headers)
    except httpx.HTTPError as exc:
        return False, f"Prefect API at {url} unreachable: {type(exc).__name__}: {exc}"
    if response.status_code != 200:
        return False, f"Prefect API at {url} answered HTTP {response.status_code}"
    return True, "ok"


class PrefectApi:
    """The Prefect API of this worker: a configured one, or a temporary server of its
    own. ``check()`` answers from the last health check, made every ``interval``
    seconds on a thread of its own, so a probe never waits on Prefect."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.url: str | None = None
        self.server: TemporaryServer | None = None
        self._last: CheckResult = (False, "connecting to the Prefect API")

    def connect(self, stopping: threading.Event) -> None:
        url = configured_url()
        if url:
            log.info("Prefect API: %s (from PREFECT_API_URL)", url, extra={"prefect_api_url": url})
        else:
            self.server = TemporaryServer()
            self._last = (False, "starting the temporary Prefect server")
            log.info(
                "Prefect API: none configured; starting a temporary local server for this "
                "worker alone at %s: its runs are visible nowhere else and are deleted when "
                "the worker stops; %s",
                self.server.url,
                HOW_TO_POINT,
                extra={"prefect_api_url": None},
            )
            url = self.server.start(stopping)
            if url is None:
                return
            use_api_url(url)
        self.url = url
        self._last = answers(url)
        threading.Thread(
            target=self._watch, args=(stopping,), name="prefect-api-check", daemon=True
        ).start()

    def _watch(self, stopping: threading.Event) -> None:
        while not stopping.wait(self.interval):
            assert self.url is not None
            self._last = answers(self.url)

    def check(self) -> CheckResult:
        return self._last

    def close(self) -> None:
        if self.server is not None:
            # Logs and events still buffered go out while the server is up: left for
            # interpreter exit, they would retry against a stopped server for a minute.
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            for service in (APILogWorker, EventsWorker):
                service.drain_all(timeout=10, at_exit=False)
            self.server.stop()


def _serve(port: int, parent_pid: int, home: Path) -> None:
    """The temporary server's process: Prefect's API app under uvicorn, as Prefect runs
    its own temporary server, ending when the worker that started it is gone (even a
    worker killed with SIGKILL leaves no server, and no database, behind)."""
    import uvicorn

    def watch_parent() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        shutil.rmtree(home, ignore_errors=True)
        os._exit(0)

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    uvicorn.run(
        "prefect.server.api.server:create_app",
        factory=True,
        host="127.0.0.1",
        port=port,
        log_level="error",
        lifespan="on",
    )


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))

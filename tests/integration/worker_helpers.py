"""Real `flowfleet worker` processes for the worker tests, and ways to watch them.

``Fleet`` starts workers as OS processes (``python -m flowfleet.cli worker …``) with the
test processors importable through PYTHONPATH, keeps their stderr in files (a pipe nobody
reads would stall a chatty worker), and kills whatever is still running at teardown.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

from flowfleet.throwaway import free_port
from flowfleet.workercmd import worker_command

HERE = Path(__file__).resolve().parent
T = TypeVar("T")

# Settings a developer's shell may hold that would change what a worker under test does.
_SCRUBBED_PREFIXES = ("DEVELOPMENT_", "PRODUCTION_", "STAGING_", "GLOBAL_", "RPA_DB_")
_SCRUBBED = {"PREFECT_ENVIRONMENT", "FLOWFLEET_DSN", "POD_NAME", "PREFECT_API_URL"}


def wait_until(
    check: Callable[[], T], timeout: float, interval: float = 0.05, what: str = "condition"
) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def worker_env(pod_name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _SCRUBBED and not k.startswith(_SCRUBBED_PREFIXES)
    }
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH")) if p)
    env["POD_NAME"] = pod_name
    env["PYTHONUNBUFFERED"] = "1"
    env["DEVELOPMENT_GLOBAL_RETRY_BACKOFF_SECONDS"] = "0.01"
    env["DEVELOPMENT_GLOBAL_RETRY_BACKOFF_MAX_SECONDS"] = "0.05"
    env.update(extra or {})
    return env


@dataclass
class HttpAnswer:
    status: int
    content_type: str
    body: str


@dataclass
class WorkerProcess:
    name: str
    proc: subprocess.Popen[bytes]
    stderr_path: Path
    port: int | None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, then reap."""
        if self.alive():
            self.proc.kill()
        self.proc.wait(10)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker {self.name} still running after {timeout}s; stderr:\n{self.stderr()}"
            ) from None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def logs(self) -> list[dict[str, Any]]:
        """The worker's JSON log lines (anything else on stderr is skipped)."""
        entries = []
        for line in self.stderr().splitlines():
            if line.startswith("{"):
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return entries

    def logged(self, fragment: str) -> bool:
        return any(fragment in entry.get("msg", "") for entry in self.logs())

    def wait_logged(self, fragment: str, timeout: float = 20.0) -> None:
        def seen() -> bool:
            if not self.alive() and not self.logged(fragment):
                raise AssertionError(
                    f"worker {self.name} exited ({self.proc.returncode}) before logging "
                    f"{fragment!r}; stderr:\n{self.stderr()}"
                )
            return self.logged(fragment)

        wait_until(seen, timeout, what=f"{self.name} to log {fragment!r}")

    def get(self, path: str, timeout: float = 10.0) -> HttpAnswer:
        assert self.port, "worker started without an HTTP port"
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return HttpAnswer(
                    response.status,
                    response.headers.get("Content-Type", ""),
                    response.read().decode(),
                )
        except urllib.error.HTTPError as exc:
            return HttpAnswer(exc.code, exc.headers.get("Content-Type", ""), exc.read().decode())

    def wait_http(self, timeout: float = 20.0) -> None:
        """Until the worker's HTTP server answers at all."""

        def answers() -> bool:
            if not self.alive():
                raise AssertionError(f"worker {self.name} exited; stderr:\n{self.stderr()}")
            try:
                self.get("/healthz", timeout=2)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False
            return True

        wait_until(answers, timeout, interval=0.1, what=f"{self.name} to serve HTTP")


class Fleet:
    """Starts workers for one test and kills every one still alive at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[WorkerProcess] = []
        self._names = 0

    def command(
        self,
        flow: str,
        entrypoint: str,
        dsn: str,
        *,
        runner: str = "plain",
        port: int = 0,
        lease_seconds: float | None = 2,
        args: Sequence[str] = (),
    ) -> list[str]:
        cmd = worker_command(
            flow,
            entrypoint,
            runner=runner,
            dsn=dsn,
            http_port=port,
            log_format="json",
            lease_seconds=lease_seconds,
        )
        return [*cmd, *args]

    def start(
        self,
        flow: str,
        entrypoint: str,
        dsn: str,
        *,
        runner: str = "plain",
        name: str | None = None,
        http: bool = False,
        lease_seconds: float | None = 2,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> WorkerProcess:
        self._names += 1
        name = name or f"{flow}-w{self._names}"
        port = free_port() if http else 0
        cmd = self.command(
            flow,
            entrypoint,
            dsn,
            runner=runner,
            port=port,
            lease_seconds=lease_seconds,
            args=args,
        )
        return self.run(cmd, name, env=env, port=port or None)

    def run(
        self,
        cmd: list[str],
        name: str,
        *,
        env: dict[str, str] | None = None,
        port: int | None = None,
    ) -> WorkerProcess:
        stderr_path = self.tmp_path / f"{name}.stderr"
        with stderr_path.open("wb") as err:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                env=worker_env(name, env),
                cwd=self.tmp_path,
            )
        worker = WorkerProcess(name, proc, stderr_path, port)
        self.started.append(worker)
        return worker

    def alive(self) -> list[WorkerProcess]:
        return [w for w in self.started if w.alive()]

    def close(self) -> None:
        for worker in self.started:
            if worker.alive():
                worker.proc.kill()
        for worker in self.started:
            try:
                worker.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture(name="fleet")
def fleet_fixture(tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path)
    try:
        yield fleet
    finally:
        fleet.close()


def run_cli(
    args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 60
) -> tuple[int, str, str]:
    """One `flowfleet …` command to completion: (exit code, stdout, stderr)."""
    result = subprocess.run(
        [sys.executable, "-m", "flowfleet.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=worker_env("cli", env),
        stdin=subprocess.DEVNULL,
    )
    return result.returncode, result.stdout, result.stderr


# -- the queue, read directly ------------------------------------------------------------


def queue_counts(conn: psycopg.Connection, flow: str) -> dict[str, int]:
    counts = dict.fromkeys(("pending", "processing", "failed", "completed"), 0)
    for status, count in conn.execute(
        "SELECT status, count(*) FROM processing_queue WHERE flow_name = %s GROUP BY status",
        (flow,),
    ):
        counts[status] = count
    row = conn.execute(
        "SELECT count(*) FROM processing_history WHERE flow_name = %s", (flow,)
    ).fetchone()
    assert row is not None
    counts["completed"] += row[0]
    return counts


def in_flight(conn: psycopg.Connection, instance_id: str) -> list[str]:
    """Payload keys the instance holds in 'processing'."""
    return [
        row[0]
        for row in conn.execute(
            "SELECT payload->>'k' FROM processing_queue"
            " WHERE flow_instance_id = %s AND status = 'processing'",
            (instance_id,),
        )
    ]


def enqueue_keys(
    conn: psycopg.Connection, flow: str, keys: range | list[int], **extra: Any
) -> None:
    from flowfleet import queue

    queue.enqueue(conn, flow, [{"k": k, **extra} for k in keys])


def drain_then_stop(
    conn: psycopg.Connection, flow: str, workers: Sequence[WorkerProcess], timeout: float
) -> None:
    """Wait until the flow has nothing pending or running, then SIGTERM every worker and
    require each to exit 0."""

    def drained() -> bool:
        counts = queue_counts(conn, flow)
        return counts["pending"] + counts["processing"] == 0

    wait_until(drained, timeout, 0.1, "the queue to drain")
    for worker in workers:
        worker.send(signal.SIGTERM)
    for worker in workers:
        assert worker.wait_exit(15) == 0, worker.stderr()

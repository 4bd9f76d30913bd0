"""Throwaway servers on free loopback ports, for the demo, tests and benchmarks: PostgreSQL,
PgBouncer (transaction pooling, in front of a throwaway PostgreSQL) and Prefect.

Uses the machine's PostgreSQL binaries (``pg_config --bindir``, then Debian's
``/usr/lib/postgresql/*/bin``). ``initdb`` refuses to run as root, so as root the server
runs as the ``postgres`` user.
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from flowfleet.errors import FlowfleetError


def find_bindir() -> Path:
    candidates: list[str] = []
    if os.environ.get("FLOWFLEET_PG_BINDIR"):
        candidates.append(os.environ["FLOWFLEET_PG_BINDIR"])
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for candidate in candidates:
        path = Path(candidate)
        if (
            (path / "initdb").exists()
            and (path / "pg_ctl").exists()
            and (path / "postgres").exists()
        ):
            return path
    raise FlowfleetError(
        "no PostgreSQL server binaries found (initdb, pg_ctl, postgres): install PostgreSQL "
        "(Debian: apt-get install postgresql) or set FLOWFLEET_DSN to a server of yours"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process_group(
    proc: subprocess.Popen[bytes], first: signal.Signals, patience: float
) -> None:
    """Ask a server's process group to stop with ``first``; SIGKILL it after ``patience``
    seconds (its children, a pooler's or a Prefect server's workers, go with it)."""
    for sig, wait in ((first, patience), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


_T = TypeVar("_T", bound="_Throwaway")


class _Throwaway:
    """``with Server() as server:`` starts it and, whatever happens, removes it."""

    def start(self: _T) -> _T:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self: _T) -> _T:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class ThrowawayPostgres(_Throwaway):
    """``with ThrowawayPostgres() as pg: pg.dsn(...)``; everything is removed on exit."""

    def __init__(self, *, durable: bool = False, max_connections: int = 200) -> None:
        self.bindir = find_bindir()
        self.port = free_port()
        self.durable = durable
        self.max_connections = max_connections
        self.root = Path(tempfile.mkdtemp(prefix="flowfleet-pg-"))
        self.datadir = self.root / "data"
        self.user = "postgres"
        self._as_root = os.geteuid() == 0

    def _run(self, *args: str) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self._as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise FlowfleetError(
                f"{args[0]} failed: {result.stderr.strip() or result.stdout.strip()}"
            )

    def start(self) -> ThrowawayPostgres:
        if self._as_root:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(
            "initdb",
            "-D",
            str(self.datadir),
            "-U",
            self.user,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        options = [
            f"-p {self.port}",
            "-c listen_addresses=127.0.0.1",
            f"-c unix_socket_directories={self.root}",
            f"-c max_connections={self.max_connections}",
            "-c shared_buffers=256MB",
            "-c timezone=UTC",
            "-c log_min_messages=warning",
        ]
        if not self.durable:
            # Tests need correctness, not crash safety: skipping fsync keeps them fast.
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        self._run(
            "pg_ctl",
            "-D",
            str(self.datadir),
            "-l",
            str(self.root / "server.log"),
            "-o",
            " ".join(options),
            "-w",
            "-t",
            "60",
            "start",
        )
        self.wait_ready()
        return self

    def restart(self, down_seconds: float = 0.0) -> None:
        """Stop the server as an operator would (fast: sessions are ended), stay down for
        ``down_seconds``, and start it again on the same port with the same options."""
        options = shlex.split((self.datadir / "postmaster.opts").read_text())[1:]
        self._run("pg_ctl", "-D", str(self.datadir), "-m", "fast", "-w", "stop")
        time.sleep(down_seconds)
        self._run(
            "pg_ctl",
            "-D",
            str(self.datadir),
            "-l",
            str(self.root / "server.log"),
            "-o",
            shlex.join(options),
            "-w",
            "start",
        )
        self.wait_ready()

    def stop(self) -> None:
        if self.datadir.exists():
            try:
                self._run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop")
            except FlowfleetError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def wait_ready(self, timeout: float = 30.0) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.dsn(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def find_pgbouncer() -> str:
    found = os.environ.get("FLOWFLEET_PGBOUNCER_BIN") or shutil.which("pgbouncer")
    for candidate in (found, "/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"):
        if candidate and Path(candidate).exists():
            return candidate
    raise FlowfleetError(
        "no pgbouncer binary found: install it (Debian: apt-get install pgbouncer)"
    )


class ThrowawayPgBouncer(_Throwaway):
    """``with ThrowawayPgBouncer(pg) as bouncer: bouncer.dsn(...)``: PgBouncer in transaction
    pooling mode in front of a throwaway PostgreSQL, every database passed through, with
    ``pool_size`` server connections per database and user: the set-up large fleets use,
    small enough that clients really do share server connections."""

    def __init__(self, server: ThrowawayPostgres, *, pool_size: int = 5) -> None:
        self.binary = find_pgbouncer()
        self.server = server
        self.pool_size = pool_size
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="flowfleet-pgbouncer-"))
        self.log = self.root / "pgbouncer.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def _config(self) -> str:
        return "\n".join(
            [
                "[databases]",
                f"* = host=127.0.0.1 port={self.server.port}",
                "[pgbouncer]",
                "listen_addr = 127.0.0.1",
                f"listen_port = {self.port}",
                "unix_socket_dir =",
                "auth_type = trust",
                f"auth_file = {self.root / 'users.txt'}",
                f"admin_users = {self.server.user}",
                "pool_mode = transaction",
                f"default_pool_size = {self.pool_size}",
                "max_client_conn = 2000",
                # Connections wait for a server connection rather than fail: a test (or a
                # benchmark) with many clients queues like a real fleet would.
                "query_wait_timeout = 120",
                "server_lifetime = 3600",
                f"logfile = {self.log}",
                "log_connections = 0",
                "log_disconnections = 0",
                "",
            ]
        )

    def start(self) -> ThrowawayPgBouncer:
        ini = self.root / "pgbouncer.ini"
        ini.write_text(self._config())
        (self.root / "users.txt").write_text(f'"{self.server.user}" ""\n')
        cmd = [self.binary, str(ini)]
        if os.geteuid() == 0:
            # PgBouncer refuses to run as root.
            shutil.chown(self.root, "postgres", "postgres")
            for path in self.root.iterdir():
                shutil.chown(path, "postgres", "postgres")
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            self.wait_ready()
        except Exception:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            self.stop()
            raise FlowfleetError(f"pgbouncer did not start:\n{log}") from None
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise FlowfleetError(f"pgbouncer exited with status {self._proc.returncode}")
            try:
                psycopg.connect(self.dsn(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.server.user}@127.0.0.1:{self.port}/{dbname}"

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process_group(proc, signal.SIGINT, 10)
        shutil.rmtree(self.root, ignore_errors=True)


class ThrowawayPrefect(_Throwaway):
    """A local Prefect server on a free loopback port with its own PREFECT_HOME, for the
    tests and benchmarks that need one server shared by several processes (without
    PREFECT_API_URL, each process would start a temporary server of its own)."""

    def __init__(self, start_timeout: float = 120.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.home = Path(tempfile.mkdtemp(prefix="flowfleet-prefect-"))
        self.client_home = self.home / "client"
        self.start_timeout = start_timeout
        self._server: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        """What a client process needs to report to this server."""
        return {
            "PREFECT_API_URL": self.url,
            "PREFECT_HOME": str(self.client_home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }

    def healthy(self) -> bool:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as answer:  # noqa: S310 - loopback
                return bool(answer.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def start(self) -> ThrowawayPrefect:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_HOME=str(self.home / "server"),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_SERVER_UI_ENABLED="false",
        )
        log = self.home / "server.log"
        with log.open("wb") as out:
            self._server = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "prefect",
                    "server",
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                # Its own process group, so stop() reaches whatever it spawns.
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout
        while not self.healthy():
            if self._server.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise FlowfleetError(f"Prefect server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        return self

    @staticmethod
    def drain_client() -> None:
        """Send this process's buffered Prefect logs and events while the server is up:
        left for interpreter exit, they retry against a stopped server for a minute."""
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        for service in (APILogWorker, EventsWorker):
            service.drain_all(timeout=15, at_exit=False)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            stop_process_group(server, signal.SIGTERM, 15)
        shutil.rmtree(self.home, ignore_errors=True)

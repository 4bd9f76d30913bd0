"""Probes as a kubelet runs them: httpGet, tcpSocket and exec, with initial delay, period,
timeout and the success/failure thresholds. Each check runs on a small thread pool so a
hung endpoint never stalls the agent's loop."""

from __future__ import annotations

import http.client
import socket
import subprocess
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

Check = Callable[[], tuple[bool, str]]


def http_check(port: int, path: str, timeout: float, headers: Mapping[str, str]) -> Check:
    def check() -> tuple[bool, str]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request("GET", path or "/", headers=dict(headers))
            answer = conn.getresponse()
            body = answer.read(200).decode(errors="replace").strip()
            # A kubelet counts 200-399 as success.
            return (
                200 <= answer.status < 400,
                f"HTTP probe failed with statuscode: {answer.status} {body}",
            )
        except OSError as exc:
            return False, f'Get "http://127.0.0.1:{port}{path}": {exc}'
        finally:
            conn.close()

    return check


def tcp_check(port: int, timeout: float) -> Check:
    def check() -> tuple[bool, str]:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=timeout).close()
            return True, ""
        except OSError as exc:
            return False, f"dial tcp 127.0.0.1:{port}: {exc}"

    return check


def exec_check(argv: list[str], env: Mapping[str, str], cwd: str, timeout: float) -> Check:
    def check() -> tuple[bool, str]:
        try:
            done = subprocess.run(
                argv, env=dict(env), cwd=cwd, capture_output=True, timeout=timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return False, str(exc)
        output = (done.stdout + done.stderr).decode(errors="replace").strip()[-200:]
        return done.returncode == 0, f"command exited {done.returncode}: {output}"

    return check


@dataclass
class Prober:
    """One probe of one container run. ``result`` is None until the first verdict."""

    kind: str  # liveness, readiness, startup
    check: Check
    initial_delay: float
    period: float
    success_threshold: int
    failure_threshold: int
    next_at: float
    result: bool | None = None
    last_message: str = ""
    successes: int = 0
    failures: int = 0
    pending: Future[tuple[bool, str]] | None = field(default=None, repr=False)

    @classmethod
    def from_spec(cls, kind: str, spec: Mapping[str, Any], check: Check, started: float) -> Prober:
        delay = float(spec.get("initialDelaySeconds") or 0)
        return cls(
            kind=kind,
            check=check,
            initial_delay=delay,
            period=float(spec.get("periodSeconds") or 10),
            success_threshold=int(spec.get("successThreshold") or 1),
            failure_threshold=int(spec.get("failureThreshold") or 3),
            next_at=started + delay,
        )

    def step(self, now: float, pool: ThreadPoolExecutor) -> bool:
        """Start a due check, take in a finished one; True when the verdict changed."""
        changed = False
        if self.pending is not None and self.pending.done():
            ok, message = self.pending.result()
            self.pending = None
            changed = self._record(ok, message)
        if self.pending is None and now >= self.next_at:
            self.next_at = now + self.period
            self.pending = pool.submit(self._safe_check)
        return changed

    def _safe_check(self) -> tuple[bool, str]:
        try:
            return self.check()
        except Exception as exc:  # a probe that cannot run has failed, never crashed us
            return False, f"probe error: {exc!r}"

    def _record(self, ok: bool, message: str) -> bool:
        before = self.result
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= self.success_threshold:
                self.result = True
        else:
            self.failures, self.successes = self.failures + 1, 0
            self.last_message = message
            if self.failures >= self.failure_threshold:
                self.result = False
        return self.result != before

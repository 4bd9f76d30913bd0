"""One container of one pod, as a local process: start, exit, restart with back-off,
probes, and the containerStatus a kubelet would write for it."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from localnode import probes, timefmt

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: the kernel SIGKILLs it when the thread
    # that started it (the agent's main thread) dies, however the agent dies.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Backoff:
    """A kubelet's crash-loop back-off: the first restart is at once, then base, 2*base,
    ... up to cap; a run longer than ``reset_after`` starts the count again."""

    base: float = 10.0
    cap: float = 300.0
    reset_after: float = 600.0

    def delay(self, crashes: int) -> float:
        if crashes <= 1:
            return 0.0
        return min(self.base * 2 ** (crashes - 2), self.cap)


@dataclass
class Exit:
    exit_code: int
    signal: int | None
    started_at: datetime
    finished_at: datetime
    reason: str

    def as_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": timefmt.rfc3339(self.started_at),
            "finishedAt": timefmt.rfc3339(self.finished_at),
            "containerID": "",
        }
        if self.signal:
            state["signal"] = self.signal
        return {"terminated": state}


class ContainerRun:
    def __init__(
        self,
        spec: Mapping[str, Any],
        run_dir: Path,
        backoff: Backoff,
        pool: ThreadPoolExecutor,
        image_id: str,
    ) -> None:
        self.spec = spec
        self.name: str = spec["name"]
        self.run_dir = run_dir
        self.backoff = backoff
        self.pool = pool
        self.image_id = image_id
        self.log_path = run_dir / f"{self.name}.log"
        self.pid_path = run_dir / f"{self.name}.pid"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at: datetime | None = None
        self.started_mono = 0.0
        self.restart_count = 0
        self.crashes = 0  # consecutive, for the back-off
        self.last_exit: Exit | None = None
        self.next_start_at = 0.0  # monotonic; 0 = may start now
        self.restart_pending = False  # exited, and the restart policy says start again
        self.previously_ran = False  # by an agent before this one (a restart of the node)
        self.succeeded = False  # an init container that has run to completion
        self.waiting_reason = "ContainerCreating"
        self.waiting_message = ""
        self.probers: dict[str, probes.Prober] = {}
        self.ports: dict[int, int] = {}  # container port -> local port

    # ------------------------------------------------------------ process ----

    @property
    def running(self) -> bool:
        return self.proc is not None

    @property
    def ever_started(self) -> bool:
        return self.started_at is not None or self.last_exit is not None or self.previously_ran

    def adopt(self, previous: Mapping[str, Any] | None) -> None:
        """Continue the count of a container an earlier agent ran (and that died with
        it): the next start is a restart, as a restarted kubelet reports it."""
        if not previous:
            return
        self.restart_count = int(previous.get("restartCount") or 0)
        state = previous.get("state") or {}
        if "running" in state or "terminated" in state or previous.get("lastState"):
            self.previously_ran = self.restart_pending = True

    def start(
        self, argv: list[str], env: Mapping[str, str], probe_checks: Mapping[str, probes.Check]
    ) -> None:
        first = not self.ever_started
        if not first:
            self.restart_count += 1
        with self.log_path.open("ab") as log:
            log.write(
                f"---- localnode: {'starting' if first else 'restarting'} {self.name} at "
                f"{timefmt.rfc3339()} (restart {self.restart_count})\n".encode()
            )
            log.flush()
            self.proc = subprocess.Popen(
                argv,
                env=dict(env),
                cwd=self.run_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own process group, so a kill reaches whatever the process spawned.
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.pid_path.write_text(f"{self.proc.pid}\n")
        self.started_at = timefmt.now()
        self.started_mono = time.monotonic()
        self.waiting_reason = self.waiting_message = ""
        self.probers = {}
        for kind in ("startup", "liveness", "readiness"):
            spec = self.spec.get(f"{kind}Probe")
            if spec and kind in probe_checks:
                self.probers[kind] = probes.Prober.from_spec(
                    kind, spec, probe_checks[kind], self.started_mono
                )

    def poll(self) -> Exit | None:
        """The exit of the running process, once, when it has ended."""
        if self.proc is None or self.proc.poll() is None:
            return None
        code = self.proc.returncode
        self.proc = None
        self.pid_path.unlink(missing_ok=True)
        sig = -code if code < 0 else None
        exit_code = 128 + sig if sig else code
        assert self.started_at is not None
        self.last_exit = Exit(
            exit_code=exit_code,
            signal=sig,
            started_at=self.started_at,
            finished_at=timefmt.now(),
            reason="Completed" if exit_code == 0 else "Error",
        )
        self.started_at = None
        self.probers = {}
        ran_for = time.monotonic() - self.started_mono
        self.crashes = 1 if ran_for > self.backoff.reset_after else self.crashes + 1
        return self.last_exit

    def kill(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def schedule_restart(self, now: float) -> float:
        """Back-off before the next start; returns the delay."""
        delay = self.backoff.delay(self.crashes)
        self.next_start_at = now + delay
        if delay:
            self.waiting_reason = "CrashLoopBackOff"
            self.waiting_message = f"back-off {delay:g}s restarting failed container={self.name}"
        return delay

    # ------------------------------------------------------------- probes ----

    def step_probes(self, now: float) -> bool:
        """Run due probes; True when a verdict changed."""
        changed = False
        startup = self.probers.get("startup")
        if startup is not None and startup.result is not True:
            return startup.step(now, self.pool)
        for kind in ("liveness", "readiness"):
            prober = self.probers.get(kind)
            if prober is not None:
                changed |= prober.step(now, self.pool)
        return changed

    @property
    def startup_done(self) -> bool:
        startup = self.probers.get("startup")
        return self.running and (startup is None or startup.result is True)

    @property
    def ready(self) -> bool:
        if not self.startup_done:
            return False
        readiness = self.probers.get("readiness")
        return readiness is None or readiness.result is True

    def failed_probe(self) -> probes.Prober | None:
        """The liveness (or startup) probe that says: restart it."""
        for kind in ("startup", "liveness"):
            prober = self.probers.get(kind)
            if prober is not None and prober.result is False:
                return prober
        return None

    # ------------------------------------------------------------- status ----

    def status(self, final: bool) -> dict[str, Any]:
        state: dict[str, Any]
        if self.proc is not None and self.started_at is not None:
            state = {"running": {"startedAt": timefmt.rfc3339(self.started_at)}}
        elif (final or self.succeeded) and self.last_exit is not None:
            state = self.last_exit.as_state()
        else:
            waiting: dict[str, Any] = {"reason": self.waiting_reason or "ContainerCreating"}
            if self.waiting_message:
                waiting["message"] = self.waiting_message
            state = {"waiting": waiting}
        status: dict[str, Any] = {
            "name": self.name,
            "image": self.spec.get("image") or "",
            "imageID": self.image_id,
            "containerID": f"localnode://{self.proc.pid}" if self.proc else "",
            "ready": self.ready or self.succeeded,
            "started": self.startup_done,
            "restartCount": self.restart_count,
            "state": state,
            "lastState": {},
        }
        if self.last_exit is not None and "terminated" not in state:
            status["lastState"] = self.last_exit.as_state()
        return status

"""The worker's health checks, as decisions from facts: /healthz (is this process alive,
or should it be restarted) and /readyz (can it work now)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from flowfleet.errors import DatabaseUnavailableError

# What /healthz and /readyz answer: (ok, one line saying why).
CheckResult = tuple[bool, str]
Check = Callable[[], CheckResult]


@dataclass(frozen=True)
class LivenessFacts:
    started: bool
    stopping: bool
    heartbeat_seconds: float
    record_timeout_seconds: float = 0.0
    dead_loops: list[int] = field(default_factory=list)
    stuck_loops: list[int] = field(default_factory=list)
    keeper_silent_seconds: float = 0.0


def liveness(facts: LivenessFacts) -> CheckResult:
    if not facts.started:
        # Waiting for the database is alive: a restart would meet the same outage.
        return True, "waiting for the database"
    if facts.dead_loops and not facts.stopping:
        return False, f"claim loops {facts.dead_loops} have died"
    if facts.stuck_loops:
        return False, (
            f"claim loops {facts.stuck_loops} stuck on a record for longer than "
            f"{facts.record_timeout_seconds:g}s"
        )
    # The keeper ticks every heartbeat; three missed ones and some slack mean it hangs.
    if facts.keeper_silent_seconds > 3 * facts.heartbeat_seconds + 5:
        return False, f"lease keeper stuck for {facts.keeper_silent_seconds:.0f}s"
    return True, "ok"


def readiness(
    stopping: bool,
    schema_version: Callable[[], int],
    needed: int,
    prefect_api: Check | None = None,
) -> CheckResult:
    """``schema_version`` reads the queue database's version; it raises
    DatabaseUnavailableError when the database does not answer. ``prefect_api`` (the
    Prefect runner's) answers from its last health check of the Prefect API."""
    if stopping:
        return False, "stopping"
    try:
        version = schema_version()
    except DatabaseUnavailableError as exc:
        return False, str(exc)
    if version < needed:
        return False, f"schema at version {version}, need {needed}"
    if prefect_api is not None:
        ok, why = prefect_api()
        if not ok:
            return False, why
    return True, "ok"

"""Kubernetes-style conditions, pure: set one, keeping lastTransitionTime unless its
status flips, and derive the summary ``Ready``."""

from __future__ import annotations

from typing import Any

Condition = dict[str, Any]

READY = "Ready"
DATABASE_REACHABLE = "DatabaseReachable"
SCHEMA_READY = "SchemaReady"
ACTIVE = "Active"
SCALING_LIMITED = "ScalingLimited"
# Ready=True needs each of these True (in this order, the first False one explains it).
PREREQUISITES = (DATABASE_REACHABLE, SCHEMA_READY)
ORDER = (READY, DATABASE_REACHABLE, SCHEMA_READY, ACTIVE, SCALING_LIMITED)


def _status(value: bool | str) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    return value


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: bool | str,
    reason: str,
    message: str,
    generation: int | None,
    now: str,
) -> list[Condition]:
    """A new list with ``type_`` set; lastTransitionTime moves only when status flips."""
    status = _status(status)
    previous = next((c for c in conditions if c.get("type") == type_), None)
    since = now
    if previous is not None and previous.get("status") == status:
        since = previous.get("lastTransitionTime") or now
    updated: Condition = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message[:32768],
        "lastTransitionTime": since,
    }
    if generation is not None:
        updated["observedGeneration"] = generation
    rest = [c for c in conditions if c.get("type") != type_]
    return sort_conditions([*rest, updated])


def get_condition(conditions: list[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def is_true(conditions: list[Condition], type_: str) -> bool:
    found = get_condition(conditions, type_)
    return found is not None and found.get("status") == "True"


def sort_conditions(conditions: list[Condition]) -> list[Condition]:
    rank = {t: i for i, t in enumerate(ORDER)}
    return sorted(conditions, key=lambda c: (rank.get(c.get("type", ""), len(ORDER)), c["type"]))


def summarize_ready(
    conditions: list[Condition], generation: int | None, now: str, blocked: tuple[str, str] | None
) -> list[Condition]:
    """Set Ready from the prerequisites; ``blocked`` (reason, message) forces it False."""
    if blocked is None:
        for type_ in PREREQUISITES:
            found = get_condition(conditions, type_)
            if found is None or found.get("status") != "True":
                reason = (found or {}).get("reason") or f"{type_}Unknown"
                message = (found or {}).get("message") or f"{type_} not yet known"
                blocked = (reason, message)
                break
    if blocked is None:
        return set_condition(
            conditions,
            READY,
            True,
            "WorkersDeployed",
            "queue ready, workers deployed",
            generation,
            now,
        )
    return set_condition(conditions, READY, False, blocked[0], blocked[1], generation, now)

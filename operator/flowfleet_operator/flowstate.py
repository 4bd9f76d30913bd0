"""What the operator knows of one DistributedFlow between ticks, and the Events it posts."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import kopf

from flowfleet.redaction import redact
from flowfleet_operator import conditions as cond
from flowfleet_operator.model import API_VERSION, KIND, FlowSpec
from flowfleet_operator.scaling import History

FlowKey = tuple[str, str]  # (namespace, name)


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Flow:
    namespace: str
    name: str
    uid: str
    generation: int
    spec: FlowSpec
    dsn: str | None = None
    deployed: bool = False
    replicas: int = 0  # the Deployment's spec.replicas, as last set or seen
    pods: int = 0  # the Deployment's status.replicas
    ready_pods: int = 0
    history: History = ()
    conditions: list[dict[str, Any]] = field(default_factory=list)
    published: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    schema_version: int | None = None
    last_scale_time: str | None = None
    secret_checked: float = 0.0
    # Set while the Secret is gone: the flow keeps scaling on the last connection string
    # it had, but says so instead of "Connected".
    secret_error: str | None = None
    desired: int | None = None  # the last decision's replicas
    # What keeps the current spec from being served (InvalidSpec, DeploymentFailed): the
    # ticks keep scaling what runs, but Ready stays False with this until a reconcile of
    # the spec goes through.
    spec_blocked: tuple[str, str] | None = None
    deployment_generation: int = 0  # highest metadata.generation seen
    expected_generation: int = 0  # our last scale's generation is at least this
    # Status is computed and written under this lock: two writers (a tick, a Deployment
    # event) must not land an older picture after a newer one.
    publishing: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def key(self) -> FlowKey:
        return (self.namespace, self.name)

    @property
    def ref(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"namespace": self.namespace, "name": self.name, "uid": self.uid},
        }

    def condition(self, type_: str, status: bool | str, reason: str, message: str) -> bool:
        """Set a condition; True when its status flipped (for one event per transition)."""
        before = cond.get_condition(self.conditions, type_)
        self.conditions = cond.set_condition(
            self.conditions, type_, status, reason, message, self.generation, utc_now()
        )
        after = cond.get_condition(self.conditions, type_)
        return before is None or (after is not None and before["status"] != after["status"])


def flow_reason(flow: Flow) -> str:
    ready = cond.get_condition(flow.conditions, cond.READY)
    return str((ready or {}).get("reason") or "Unknown")


def post_event(flow: Flow, *, type: str, reason: str, message: str) -> None:
    """A core/v1 Event on the DistributedFlow, posted by kopf in the background."""
    ref: Any = flow.ref  # kopf reads a reference's fields from any mapping
    kopf.event(ref, type=type, reason=reason, message=redact(message))

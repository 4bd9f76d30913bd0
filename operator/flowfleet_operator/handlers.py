"""kopf registrations: one-line bodies; the work is in ``fleet``."""

from __future__ import annotations

from typing import Any

import kopf

from flowfleet_operator import runtime
from flowfleet_operator.manifests import MANAGED_BY
from flowfleet_operator.model import GROUP, PLURAL, VERSION

_WORKERS = {"app.kubernetes.io/managed-by": MANAGED_BY}


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    await runtime.startup(settings, memo)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    await runtime.cleanup(memo)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def reconcile(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await memo.fleet.reconcile(body)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def flow_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    await runtime.flow_event(memo.fleet, event)


@kopf.on.event("apps", "v1", "deployments", labels=_WORKERS)
async def deployment_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    await runtime.deployment_event(memo.fleet, event)


@kopf.on.event("", "v1", "pods", labels=_WORKERS)
async def pod_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    await runtime.pod_event(memo.fleet, event)

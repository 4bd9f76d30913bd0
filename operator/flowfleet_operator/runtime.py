"""What the handlers call: framework settings at start-up, and the routing of watched
events to the fleet."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from flowfleet_operator import metrics
from flowfleet_operator.fleet import Fleet
from flowfleet_operator.kube import Kube, load_api_client
from flowfleet_operator.model import KIND
from flowfleet_operator.settings import OperatorSettings

PREFIX = "flowfleet.io"


def configure_kopf(settings: kopf.OperatorSettings) -> None:
    # Handler progress and the diff base in annotations under our group: the status
    # schema is closed, and the API server would prune anything kopf put there.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration"
    )
    # None is ever added (no timers, daemons or deletion handlers); named ours anyway.
    settings.persistence.finalizer = f"{PREFIX}/finalizer"
    # kopf's own "handler succeeded" chatter stays in the log; Events are ours.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    settings.peering.standalone = True


async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo) -> None:
    configure_kopf(settings)
    # Every API call and database read runs in a thread; a database that hangs until its
    # connect timeout must not starve the others of threads (the default is cores + 4).
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=32, thread_name_prefix="flowfleet")
    )
    operator_settings: OperatorSettings = memo.operator_settings
    fleet = Fleet(operator_settings, Kube(load_api_client()))
    fleet.start()
    memo.fleet = fleet
    memo.http = None
    if operator_settings.http_port:
        memo.http = await metrics.start_http(operator_settings.http_port, fleet.healthy)


async def cleanup(memo: kopf.Memo) -> None:
    fleet: Fleet | None = getattr(memo, "fleet", None)
    if fleet is not None:
        await fleet.stop()
        fleet.kube.close()
    if getattr(memo, "http", None) is not None:
        await memo.http.cleanup()


async def flow_event(fleet: Fleet, event: Any) -> None:
    if event.get("type") == "DELETED":
        meta = event["object"]["metadata"]
        await fleet.forget(meta["namespace"], meta["name"])


def _owner(body: Any) -> str | None:
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("controller"):
            return str(ref.get("name"))
    return None


async def deployment_event(fleet: Fleet, event: Any) -> None:
    body = event.get("object") or {}
    owner = _owner(body)
    if owner is not None and event.get("type") != "DELETED":
        await fleet.deployment_changed(body["metadata"]["namespace"], owner, body)


async def pod_event(fleet: Fleet, event: Any) -> None:
    meta = event["object"]["metadata"]
    if event.get("type") == "DELETED":
        await fleet.pod_deleted(meta["namespace"], meta["name"], dict(meta.get("labels") or {}))
    else:
        fleet.pod_seen(meta["namespace"], meta["name"], dict(meta.get("annotations") or {}))

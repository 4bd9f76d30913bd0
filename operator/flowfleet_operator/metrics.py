"""Prometheus metrics of the operator, in a registry of its own, and the small HTTP
server for /healthz and /metrics."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

REGISTRY = CollectorRegistry()
_FLOW = ("namespace", "name")

PENDING = Gauge("flowfleet_operator_pending_records", "Pending records", _FLOW, registry=REGISTRY)
PROCESSING = Gauge(
    "flowfleet_operator_processing_records", "Records in flight", _FLOW, registry=REGISTRY
)
DESIRED = Gauge(
    "flowfleet_operator_desired_replicas", "Replicas the policy wants", _FLOW, registry=REGISTRY
)
REPLICAS = Gauge(
    "flowfleet_operator_replicas", "Worker pods of the Deployment", _FLOW, registry=REGISTRY
)
SCALE_EVENTS = Counter(
    "flowfleet_operator_scale_events",
    "Deployment scalings",
    (*_FLOW, "direction"),
    registry=REGISTRY,
)
RECONCILE_ERRORS = Counter(
    "flowfleet_operator_reconcile_errors",
    "Failed reconciles",
    (*_FLOW, "reason"),
    registry=REGISTRY,
)
CLAIMS_RELEASED = Counter(
    "flowfleet_operator_claims_released",
    "Claims of deleted pods given back",
    _FLOW,
    registry=REGISTRY,
)
API_WRITES = Counter(
    "flowfleet_operator_api_writes",
    "Writes to the API server (status, scale, apply, pods)",
    registry=REGISTRY,
)
TICK_SECONDS = Histogram(
    "flowfleet_operator_tick_seconds",
    "One database's depth read and scaling decisions",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)


def forget_flow(namespace: str, name: str) -> None:
    for gauge in (PENDING, PROCESSING, DESIRED, REPLICAS):
        try:
            gauge.remove(namespace, name)
        except KeyError:
            pass


async def start_http(port: int, healthy: Callable[[], bool]) -> web.AppRunner:
    async def healthz(_: web.Request) -> web.Response:
        ok = healthy()
        return web.Response(text="ok\n" if ok else "unhealthy\n", status=200 if ok else 503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()  # noqa: S104 - a pod's probe port
    return runner

"""serve(port, checks, registry): named checks and /metrics on a real loopback port, with
no worker behind it."""

from __future__ import annotations

import urllib.error
import urllib.request

from prometheus_client import CollectorRegistry, Counter

from flowfleet.httpserver import serve


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_named_checks_and_metrics() -> None:
    registry = CollectorRegistry()
    Counter("served_things", "Things served.", registry=registry).inc(7)
    state = {"ready": False}
    server = serve(
        0,
        {"healthz": lambda: (True, "ok"), "readyz": lambda: (state["ready"], "warming up")},
        registry,
        host="127.0.0.1",
    )
    try:
        port = server.server_address[1]
        assert get(port, "/healthz") == (200, "ok\n")
        assert get(port, "/readyz") == (503, "warming up\n")
        state["ready"] = True
        assert get(port, "/readyz") == (200, "warming up\n")
        status, body = get(port, "/metrics")
        assert status == 200 and "served_things_total 7.0" in body
        assert get(port, "/nothing")[0] == 404
    finally:
        server.shutdown()

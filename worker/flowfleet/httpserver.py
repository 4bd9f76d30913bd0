"""One HTTP port per process: a plain-text answer per named check, and /metrics.

``serve(8080, {"healthz": alive, "readyz": ready}, registry)`` answers ``/healthz`` with
200 or 503 and the check's reason, and ``/metrics`` from the Prometheus registry. It knows
nothing of what it reports on, so the worker and the operator can both use it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

# A check answers (ok, one line saying why).
Check = Callable[[], tuple[bool, str]]


def serve(
    port: int,
    checks: Mapping[str, Check],
    registry: CollectorRegistry,
    host: str = "0.0.0.0",  # noqa: S104 - probes come from the kubelet
) -> ThreadingHTTPServer:
    """Serve ``/<name>`` for each check and ``/metrics`` on a daemon thread; returns the
    server (``shutdown()`` stops it; ``server_address`` says the port bound)."""
    routes = {f"/{name.strip('/')}": check for name, check in checks.items()}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                return
            check = routes.get(self.path)
            if check is None:
                self._send(404, b"not found\n")
                return
            ok, reason = check()
            self._send(200 if ok else 503, f"{reason}\n".encode())

        def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return  # probes every few seconds would drown the process's own log

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server

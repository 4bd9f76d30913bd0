"""The kubelet's log endpoint, so that ``kubectl logs`` works: the API server proxies
``pods/log`` to ``https://<node InternalIP>:<kubeletEndpoint port>/containerLogs/<ns>/
<pod>/<container>``. Loopback only; TLS with a self-signed certificate (the API server
checks a kubelet's certificate only when started with --kubelet-certificate-authority,
which cluster.sh does not set). Logs only: no exec, attach or port-forward."""

from __future__ import annotations

import logging
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

log = logging.getLogger("localnode.logs")

# The agent writes one line like this before each start of a container (pod.py):
# `kubectl logs` shows what follows the last one, `--previous` the run before it.
START_MARKER = b"---- localnode: "
FOLLOW_POLL_SECONDS = 0.2


def runs(text: bytes) -> list[bytes]:
    """A container's log file split into its runs, oldest first, markers dropped."""
    chunks: list[bytes] = []
    current: list[bytes] = []
    for line in text.splitlines(keepends=True):
        if line.startswith(START_MARKER):
            chunks.append(b"".join(current))
            current = []
        else:
            current.append(line)
    chunks.append(b"".join(current))
    return chunks[1:] if len(chunks) > 1 else chunks


def tail(data: bytes, lines: int | None, limit: int | None) -> bytes:
    if lines is not None:
        data = b"".join(data.splitlines(keepends=True)[-lines:]) if lines > 0 else b""
    if limit is not None:
        data = data[:limit]
    return data


def self_signed(pki: Path) -> tuple[Path, Path]:
    pki.mkdir(parents=True, exist_ok=True)
    cert, key = pki / "kubelet.crt", pki / "kubelet.key"
    if not cert.exists() or not key.exists():
        command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650"]
        command += ["-subj", "/CN=localnode", "-addext", "subjectAltName=IP:127.0.0.1"]
        subprocess.run(
            [*command, "-keyout", str(key), "-out", str(cert)],
            check=True,
            capture_output=True,
        )
        key.chmod(0o600)
    return cert, key


class LogServer:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    def find(self, namespace: str, pod: str, container: str) -> Path | None:
        """The newest pod dir of that name (a pod dir is per uid)."""
        found = sorted(
            (self.state_dir / "pods").glob(f"{namespace}_{pod}_*/{container}.log"),
            key=lambda p: p.stat().st_mtime,
        )
        return found[-1] if found else None

    def start(self) -> int:
        cert, key = self_signed(self.state_dir / "pki")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        server.daemon_threads = True
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server = server
        threading.Thread(target=server.serve_forever, name="kubelet-logs", daemon=True).start()
        return int(server.server_address[1])

    def stop(self) -> None:
        self.stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        logs = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlparse(self.path)
                parts = url.path.strip("/").split("/")
                if len(parts) != 4 or parts[0] != "containerLogs":
                    self._send(404, b"localnode serves container logs only\n")
                    return
                _, namespace, pod, container = parts
                path = logs.find(namespace, pod, container)
                if path is None:
                    self._send(404, f"no log for {namespace}/{pod}/{container}\n".encode())
                    return
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                chunks = runs(path.read_bytes())
                previous = query.get("previous") == "true"
                if previous and len(chunks) < 2:
                    self._send(
                        400, f"previous terminated container {container} not found\n".encode()
                    )
                    return
                lines = int(query["tailLines"]) if query.get("tailLines", "").isdigit() else None
                limit = int(query["limitBytes"]) if query.get("limitBytes", "").isdigit() else None
                body = tail(chunks[-2] if previous else chunks[-1], lines, limit)
                follow = query.get("follow") == "true" and not previous
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                if not follow:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                if follow:
                    self._follow(path, path.stat().st_size)

            def _follow(self, path: Path, offset: int) -> None:
                # Until the client goes (kubectl logs -f interrupted) or the agent stops.
                try:
                    while not logs.stopping.is_set() and path.exists():
                        with path.open("rb") as handle:
                            handle.seek(offset)
                            data = handle.read()
                        if data:
                            offset += len(data)
                            self.wfile.write(data)
                            self.wfile.flush()
                        time.sleep(FOLLOW_POLL_SECONDS)
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    return

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("%s %s", self.address_string(), format % args)

        return Handler

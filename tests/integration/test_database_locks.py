"""One unreachable database must not stall callers of another: no network I/O happens
under the process-wide registry lock."""

from __future__ import annotations

import socket
import threading

from flowfleet.database import DatabaseManager
from flowfleet.errors import DatabaseUnavailableError


def test_a_silent_database_does_not_stall_another(dsn: str) -> None:
    # A server that accepts the TCP connection and never says a word: the probe of the
    # pool waits on it until its connect timeout.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    port = silent.getsockname()[1]
    accepted: list[socket.socket] = []
    probing = threading.Event()

    def accept() -> None:
        peer, _ = silent.accept()
        accepted.append(peer)
        probing.set()

    threading.Thread(target=accept, daemon=True).start()
    stalled = DatabaseManager(
        "stalled_db", connection_string=f"postgresql://u:secret@127.0.0.1:{port}/x"
    )
    errors: list[Exception] = []

    def open_stalled() -> None:
        try:
            stalled.pool  # noqa: B018 - building the pool is the point
        except DatabaseUnavailableError as exc:
            errors.append(exc)

    stalled_caller = threading.Thread(target=open_stalled, daemon=True)
    stalled_caller.start()
    try:
        assert probing.wait(10), "the probe never reached the silent server"
        healthy = DatabaseManager("healthy_db", connection_string=dsn)
        with healthy.connection(timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        # Answered while the other database's probe was still waiting.
        assert stalled_caller.is_alive()
        healthy.close()
    finally:
        for peer in accepted:
            peer.close()  # the probe now fails at once
        silent.close()
        stalled_caller.join(15)
    assert not stalled_caller.is_alive()
    assert errors and "stalled_db" in str(errors[0]) and "secret" not in str(errors[0])

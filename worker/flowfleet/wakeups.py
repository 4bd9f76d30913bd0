"""Waking idle claim loops the moment work arrives.

``WakeUps`` is a generation counter: a loop notes the generation before it claims, so a
wake-up that lands between an empty claim and the wait is not lost. The notification
listener LISTENs for enqueues of the flow and bumps it.

LISTEN needs a session of its own, which a transaction pooler (PgBouncer in transaction
mode) does not keep: through one, the listener uses the direct connection string
FLOWFLEET_LISTEN_DSN when it is set, and otherwise the claim loops poll, said once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

import psycopg

from flowfleet import queue
from flowfleet.backoff import Backoff
from flowfleet.errors import DatabaseUnavailableError

log = logging.getLogger("flowfleet.worker")


class ListenSource(Protocol):
    """The parts of ``DatabaseManager`` the listener uses."""

    @property
    def listen_dsn(self) -> str | None: ...

    def connect_for_listen(self) -> psycopg.Connection: ...


class WakeUps:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.generation = 0

    def bump(self) -> None:
        with self._cond:
            self.generation += 1
            self._cond.notify_all()

    def wait(self, seen: int, timeout: float, stop: threading.Event) -> bool:
        """Until the generation moves past ``seen``, ``stop`` is set, or ``timeout``
        passes; True unless it timed out."""
        with self._cond:
            return self._cond.wait_for(lambda: self.generation != seen or stop.is_set(), timeout)


def listen_for_enqueues(
    connect: Callable[[], psycopg.Connection],
    flow_name: str,
    wakeups: WakeUps,
    stopping: threading.Event,
) -> None:
    """LISTEN for enqueues of ``flow_name`` until ``stopping``; on any trouble, reconnect.
    Polling in the claim loops covers the gaps, so a lost notification costs latency,
    never work."""
    backoff = Backoff()
    while not stopping.is_set():
        try:
            with connect() as conn:
                queue.listen(conn)
                backoff.reset()
                wakeups.bump()  # anything enqueued while we were away
                while not stopping.is_set():
                    for note in conn.notifies(timeout=1.0):
                        if note.payload == flow_name:
                            wakeups.bump()
        except (psycopg.Error, DatabaseUnavailableError):
            stopping.wait(backoff.next_delay())


def wake_on_enqueues(
    db: ListenSource, flow_name: str, wakeups: WakeUps, stopping: threading.Event
) -> None:
    """Listen where the database allows it (see the module's docstring); without a
    connection that can LISTEN, say once that the claim loops poll, and return."""
    if db.listen_dsn is None:
        log.info(
            "the queue database is reached through a transaction pooler, where LISTEN "
            "cannot work: idle claim loops poll (--poll-seconds); set FLOWFLEET_LISTEN_DSN "
            "to a direct connection string for instant wake-ups"
        )
        return
    listen_for_enqueues(db.connect_for_listen, flow_name, wakeups, stopping)

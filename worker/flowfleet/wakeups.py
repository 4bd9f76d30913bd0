"""Waking idle claim loops the moment work arrives.

``WakeUps`` is a generation counter: a loop notes the generation before it claims, so a
wake-up that lands between an empty claim and the wait is not lost. The notification
listener LISTENs for enqueues of the flow and bumps it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import psycopg

from flowfleet import queue
from flowfleet.backoff import Backoff
from flowfleet.errors import DatabaseUnavailableError


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

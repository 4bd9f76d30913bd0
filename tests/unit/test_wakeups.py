"""The wake-up generation counter: a wake-up is never lost between a claim and the wait."""

from __future__ import annotations

import threading
import time

from flowfleet.wakeups import WakeUps


def test_bump_moves_the_generation() -> None:
    wakeups = WakeUps()
    before = wakeups.generation
    wakeups.bump()
    wakeups.bump()
    assert wakeups.generation == before + 2


def test_a_bump_before_the_wait_is_not_lost() -> None:
    wakeups, stop = WakeUps(), threading.Event()
    seen = wakeups.generation  # noted before the (empty) claim
    wakeups.bump()  # work arrives between the claim and the wait
    started = time.monotonic()
    assert wakeups.wait(seen, timeout=30, stop=stop) is True
    assert time.monotonic() - started < 5  # returned at once, not after the timeout


def test_no_bump_waits_out_the_timeout() -> None:
    wakeups, stop = WakeUps(), threading.Event()
    assert wakeups.wait(wakeups.generation, timeout=0.05, stop=stop) is False


def test_stop_ends_the_wait() -> None:
    wakeups, stop = WakeUps(), threading.Event()
    stop.set()
    assert wakeups.wait(wakeups.generation, timeout=30, stop=stop) is True


def test_a_bump_from_another_thread_wakes_a_waiter() -> None:
    wakeups, stop = WakeUps(), threading.Event()
    seen = wakeups.generation
    woke: list[bool] = []
    waiter = threading.Thread(target=lambda: woke.append(wakeups.wait(seen, 30, stop)))
    waiter.start()
    wakeups.bump()
    waiter.join(10)
    assert not waiter.is_alive()
    assert woke == [True]

"""The pool registry hands out only what this process made: a forked child never uses,
closes or lets go of its parent's pools."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any, cast

import pytest

from flowfleet.pools import PoolRegistry as _Registry


class Pooled:
    """Stands for a pool or engine: the registry never calls anything on what it holds."""


@pytest.fixture(autouse=True)
def empty_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(_Registry, "pools", {})
    monkeypatch.setattr(_Registry, "engines", {})
    monkeypatch.setattr(_Registry, "building", {})
    monkeypatch.setattr(_Registry, "inherited", [])
    monkeypatch.setattr(_Registry, "lock", threading.Lock())
    yield


def test_own_entry_is_handed_out() -> None:
    mine = Pooled()
    _Registry.store(_Registry.pools, "db", mine)
    assert _Registry.lookup(_Registry.pools, "db") is mine
    assert _Registry.pop(_Registry.pools, "db") is mine
    assert _Registry.lookup(_Registry.pools, "db") is None


def test_entry_of_another_process_is_set_aside_not_handed_out() -> None:
    parents = Pooled()
    _Registry.pools["db"] = (os.getpid() + 1, cast(Any, parents))
    assert _Registry.lookup(_Registry.pools, "db") is None
    assert "db" not in _Registry.pools
    assert _Registry.inherited == [parents]  # still referenced: never collected or closed


def test_close_leaves_another_process_entry_alone() -> None:
    parents = Pooled()
    _Registry.engines["db"] = (os.getpid() + 1, parents)
    assert _Registry.pop(_Registry.engines, "db") is None
    assert _Registry.inherited == [parents]


def test_after_fork_everything_inherited_is_set_aside_and_locks_are_new() -> None:
    pool, engine = Pooled(), Pooled()
    _Registry.store(_Registry.pools, "a", pool)
    _Registry.store(_Registry.engines, "b", engine)
    held = _Registry.building_lock("a")
    held.acquire()  # as if another thread of the parent was building a pool at the fork
    old_lock = _Registry.lock
    _Registry.forget_inherited()
    assert _Registry.pools == {} and _Registry.engines == {}
    assert _Registry.inherited == [pool, engine]
    assert _Registry.lock is not old_lock
    assert _Registry.building_lock("a").acquire(blocking=False)


def test_building_lock_is_one_per_name() -> None:
    assert _Registry.building_lock("a") is _Registry.building_lock("a")
    assert _Registry.building_lock("a") is not _Registry.building_lock("b")

"""The process-wide registry of connection pools and engines, fork-aware."""

from __future__ import annotations

import os
import threading
from typing import Any

from psycopg_pool import ConnectionPool


class PoolRegistry:
    """One pool (or engine) per database name per process, shared by every DatabaseManager.

    Fork-aware: each entry remembers the process that made it. A forked child never uses
    what it inherited; it builds its own pools, and keeps the inherited ones referenced
    but untouched: closing one, or letting it be collected, would talk on sockets the
    parent is still using. The lock guards the dictionaries only and is never held over
    network I/O, so one unreachable database cannot stall callers of another.
    """

    lock = threading.Lock()
    pools: dict[str, tuple[int, ConnectionPool]] = {}
    engines: dict[str, tuple[int, Any]] = {}
    # Serialises building the pool of one database; callers of others never wait on it.
    building: dict[str, threading.Lock] = {}
    # What this process inherited from its parent: kept alive, never used or closed.
    inherited: list[Any] = []

    @classmethod
    def lookup(cls, table: dict[str, tuple[int, Any]], key: str) -> Any | None:
        with cls.lock:
            entry = table.get(key)
            if entry is None:
                return None
            pid, item = entry
            if pid == os.getpid():
                return item
            # Made in another process (a fork the at-fork hook did not see).
            cls.inherited.append(item)
            del table[key]
            return None

    @classmethod
    def store(cls, table: dict[str, tuple[int, Any]], key: str, item: Any) -> None:
        with cls.lock:
            table[key] = (os.getpid(), item)

    @classmethod
    def pop(cls, table: dict[str, tuple[int, Any]], key: str) -> Any | None:
        """Remove this process's entry for ``key`` and return it, for closing."""
        with cls.lock:
            entry = table.pop(key, None)
            if entry is None:
                return None
            pid, item = entry
            if pid != os.getpid():
                cls.inherited.append(item)
                return None
            return item

    @classmethod
    def building_lock(cls, key: str) -> threading.Lock:
        with cls.lock:
            return cls.building.setdefault(key, threading.Lock())

    @classmethod
    def forget_inherited(cls) -> None:
        """In a freshly forked child: set aside every pool and engine of the parent, and
        replace the locks, which another thread of the parent may have held at the fork."""
        cls.lock = threading.Lock()
        cls.building = {}
        cls.inherited.extend(item for _, item in cls.pools.values())
        cls.inherited.extend(item for _, item in cls.engines.values())
        cls.pools = {}
        cls.engines = {}


os.register_at_fork(after_in_child=PoolRegistry.forget_inherited)

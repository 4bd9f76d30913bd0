"""The anchor: PgQueuer (asyncpg driver, its own schema), run as its users run it."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import asyncpg
from pgqueuer import AsyncpgDriver, Queries, QueueManager
from pgqueuer.types import QueueExecutionMode


async def _install(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await Queries(AsyncpgDriver(conn)).install()
    finally:
        await conn.close()


async def _enqueue(dsn: str, count: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        queries = Queries(AsyncpgDriver(conn))
        chunk = 10_000
        for start in range(0, count, chunk):
            n = min(chunk, count - start)
            await queries.enqueue(["noop"] * n, [None] * n, [0] * n)
    finally:
        await conn.close()


def install(dsn: str) -> None:
    asyncio.run(_install(dsn))


def enqueue(dsn: str, count: int) -> None:
    asyncio.run(_enqueue(dsn, count))


async def _drain(dsn: str, batch_size: int, ready: Any, go: Any) -> None:
    conn = await asyncpg.connect(dsn)
    qm = QueueManager(Queries(AsyncpgDriver(conn)))

    @qm.entrypoint("noop")
    async def noop(job: Any) -> None:
        return None

    ready.set()
    await asyncio.get_running_loop().run_in_executor(None, go.wait)
    await qm.run(
        batch_size=batch_size,
        mode=QueueExecutionMode.drain,
        dequeue_timeout=timedelta(seconds=0.2),
    )
    await conn.close()


def drain(dsn: str, batch_size: int, *, ready: Any, go: Any) -> None:
    asyncio.run(_drain(dsn, batch_size, ready, go))

"""Shared scaffolding for side-by-side benchmarks: one durable PostgreSQL per run, N
processes released together, medians and ratios."""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from flowfleet.migrate import migrate
from flowfleet.throwaway import ThrowawayPostgres


def server() -> ThrowawayPostgres:
    # Durable: fsync and synchronous commit on, as production runs, for both contenders.
    return ThrowawayPostgres(durable=True).start()


def create_database(pg: ThrowawayPostgres, name: str, *, flowfleet_schema: bool) -> str:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    dsn = pg.dsn(name)
    if flowfleet_schema:
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn)
    return dsn


def _entry(target: Callable[..., Any], args: Sequence[Any], ready: Any, go: Any) -> None:
    target(*args, ready=ready, go=go)


def run_processes(target: Callable[..., Any], args_per_process: Sequence[Sequence[Any]]) -> float:
    """Start one process per args, each calling ``target(*args, ready=, go=)``; the target
    sets ``ready`` once connected and waits for ``go``. Returns seconds from go to all done."""
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    readies = [ctx.Event() for _ in args_per_process]
    procs = [
        ctx.Process(target=_entry, args=(target, args, ready, go))
        for args, ready in zip(args_per_process, readies, strict=True)
    ]
    for p in procs:
        p.start()
    for ready in readies:
        if not ready.wait(120):
            raise RuntimeError("a benchmark process did not get ready")
    started = time.perf_counter()
    go.set()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"benchmark process exited {p.exitcode}")
    return time.perf_counter() - started


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def row(label: str, value: str, note: str = "") -> None:
    print(f"  {label:<58} {value:>14}  {note}")

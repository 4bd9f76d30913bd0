"""Scale: many claim loops, many flows, a long history; the figures behind docs/capacity.md.

    make bench                                  # runs this with --quick (under 2 minutes)
    .venv/bin/python bench/bench_scale.py --full

1. Loop-count curve: 1 to 200 claim loops (processes x threads, each loop its own
   connection) draining one flow at batch 10, beside PgQueuer 1.6 with as many consumers
   (processes x QueueManagers, each its own connection) in the same run; every record
   claimed once. Then EXPLAIN ANALYZE of one claim while the loops contend.
2. Claims per PostgreSQL core: records completed per CPU-second of the server's processes
   (backends, their exited children, background workers) at batch 10, 50 and 200.
3. Prepared statements: the drain with psycopg's server-side prepares (direct connection)
   against prepare_threshold=None (what a transaction pooler needs).
4. 1,000 flows, 10 busy: one flow's claim/complete round trip with and without 990 other
   flows' backlogs, and the depth of all flows in one query.
5. Retention: cleanup of the oldest quarter of N completed records (--quick 1,000,000,
   --full 10,000,000) in paced batches while 2 claim loops drain; cleanup runs in every
   other window: claim rate with / without it, and the longest cleanup transaction.
6. Connections: server connections one real `flowfleet worker` process holds at
   concurrency 1, 4 and 16, straight to PostgreSQL and through PgBouncer.
Rates are medians of --repeats runs; ratios are taken within a run, then their median.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import pgqueuer_side
from flowfleet import queue
from flowfleet.throwaway import ThrowawayPgBouncer, ThrowawayPostgres

HERE = Path(__file__).resolve().parent
FLOW = "scale"
# Server connections PgBouncer keeps for the benchmark's database: twice the cores.
POOL = 4
TICKS = os.sysconf("SC_CLK_TCK")


# -- server CPU ------------------------------------------------------------------------


def server_cpu_seconds(pg: ThrowawayPostgres) -> float:
    """CPU time of the whole server so far: the postmaster, its live children, and the
    children it has reaped (exited backends count in its cutime/cstime)."""
    postmaster = int((pg.datadir / "postmaster.pid").read_text().split()[0])

    def times(pid: int, children: bool) -> tuple[int, int]:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        # fields[1] is ppid; utime, stime, cutime, cstime are fields[11:15]
        own = int(fields[11]) + int(fields[12])
        return int(fields[1]), own + (int(fields[13]) + int(fields[14]) if children else 0)

    total = times(postmaster, True)[1]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid, ticks = times(int(entry), False)
            except (OSError, IndexError):
                continue
            if ppid == postmaster:
                total += ticks
    return total / TICKS


# -- flowfleet claim loops ---------------------------------------------------------------


def drain_loops(
    dsn: str,
    flow: str,
    batch: int,
    threads: int,
    name: str,
    prepare: bool,
    *,
    ready: Any,
    go: Any,
) -> None:
    """``threads`` claim loops in this process, each on its own connection, until the
    flow is empty; each loop's claimed ids go to a file for the exactly-once check."""
    kwargs: dict[str, Any] = {} if prepare else {"prepare_threshold": None}
    conns = [psycopg.connect(dsn, autocommit=True, **kwargs) for _ in range(threads)]
    ready.set()
    go.wait()

    def loop(index: int, conn: psycopg.Connection) -> None:
        instance = f"{name}-{index}"
        ids: list[int] = []
        got = queue.claim(conn, flow, instance, batch, 60)
        while got:
            ids += [r.id for r in got]
            got = queue.complete_and_claim(conn, got, flow, instance, batch, 60)
        Path(os.environ["BENCH_IDS_DIR"], instance).write_text(" ".join(map(str, ids)))

    workers = [threading.Thread(target=loop, args=(i, c)) for i, c in enumerate(conns)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    for c in conns:
        c.close()


def split(loops: int) -> tuple[int, int]:
    """(processes, threads per process) for ``loops`` claim loops on 2 cores."""
    procs = min(loops, 4)
    return procs, loops // procs


def enqueue(dsn: str, flow: str, count: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        queue.enqueue(conn, flow, ({"n": i} for i in range(count)))
        conn.execute("VACUUM ANALYZE processing_queue")


def flowfleet_drain(
    pg: ThrowawayPostgres,
    dsn: str,
    records: int,
    loops: int,
    batch: int,
    ids_dir: Path,
    prepare: bool = True,
) -> tuple[float, float]:
    """(records/s, server CPU seconds) of draining ``records`` with ``loops`` loops;
    asserts every record was claimed exactly once."""
    enqueue(dsn, FLOW, records)
    for old in ids_dir.iterdir():
        old.unlink()
    procs, threads = split(loops)
    cpu = server_cpu_seconds(pg)
    seconds = common.run_processes(
        drain_loops,
        [(dsn, FLOW, batch, threads, f"l{p}", prepare) for p in range(procs)],
    )
    cpu = server_cpu_seconds(pg) - cpu
    claimed = [int(i) for f in ids_dir.iterdir() for i in f.read_text().split()]
    assert len(claimed) == records == len(set(claimed)), (len(claimed), len(set(claimed)))
    return records / seconds, cpu


# -- PgQueuer consumers ------------------------------------------------------------------


async def _pgqueuer_consumers(dsn: str, batch: int, count: int, ready: Any, go: Any) -> None:
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries, QueueManager
    from pgqueuer.types import QueueExecutionMode

    managers = []
    for _ in range(count):
        conn = await asyncpg.connect(dsn)
        qm = QueueManager(Queries(AsyncpgDriver(conn)))

        @qm.entrypoint("noop")
        async def noop(job: Any) -> None:
            return None

        managers.append((qm, conn))
    ready.set()
    await asyncio.get_running_loop().run_in_executor(None, go.wait)
    await asyncio.gather(
        *(
            qm.run(
                batch_size=batch,
                mode=QueueExecutionMode.drain,
                dequeue_timeout=timedelta(seconds=0.2),
            )
            for qm, _ in managers
        )
    )
    for _, conn in managers:
        await conn.close()


def pgqueuer_consumers(dsn: str, batch: int, count: int, *, ready: Any, go: Any) -> None:
    asyncio.run(_pgqueuer_consumers(dsn, batch, count, ready, go))


def pgqueuer_drain(dsn: str, records: int, loops: int, batch: int) -> float:
    pgqueuer_side.enqueue(dsn, records)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE pgqueuer")
    procs, per_proc = split(loops)
    seconds = common.run_processes(pgqueuer_consumers, [(dsn, batch, per_proc)] * procs)
    with psycopg.connect(dsn, autocommit=True) as conn:
        left = conn.execute("SELECT count(*) FROM pgqueuer").fetchone()
    assert left == (0,), f"PgQueuer left {left} jobs"
    return records / seconds


# -- EXPLAIN under contention --------------------------------------------------------------


def explain_claim_under_contention(
    pg: ThrowawayPostgres, dsn: str, ids_dir: Path, loops: int, batch: int
) -> list[str]:
    """EXPLAIN (ANALYZE, BUFFERS) of one claim taken while ``loops`` loops drain."""
    enqueue(dsn, FLOW, 8_000)
    for old in ids_dir.iterdir():
        old.unlink()
    procs, threads = split(loops)
    plan: list[str] = []

    def sample() -> None:
        time.sleep(0.5)
        with psycopg.connect(dsn, autocommit=True) as conn:
            with conn.transaction():
                rows = conn.execute(
                    "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + queue.query("claim"),
                    {
                        "flow_name": FLOW,
                        "instance_id": "explain",
                        "batch_size": batch,
                        "lease_seconds": 60,
                    },
                ).fetchall()
                plan.extend(r[0] for r in rows)
                raise psycopg.Rollback()

    sampler = threading.Thread(target=sample)
    sampler.start()
    common.run_processes(
        drain_loops, [(dsn, FLOW, batch, threads, f"e{p}", True) for p in range(procs)]
    )
    sampler.join()
    return plan


# -- many flows ----------------------------------------------------------------------------


def claim_round_trips(dsn: str, flow: str, batch: int, rounds: int, prepare: bool = True) -> float:
    """Median seconds of one complete-and-claim round trip on ``flow``."""
    times = []
    kwargs: dict[str, Any] = {} if prepare else {"prepare_threshold": None}
    with psycopg.connect(dsn, autocommit=True, **kwargs) as conn:
        got = queue.claim(conn, flow, "probe", batch, 60)
        for _ in range(rounds):
            started = time.perf_counter()
            got = queue.complete_and_claim(conn, got, flow, "probe", batch, 60)
            times.append(time.perf_counter() - started)
            assert got, "the probed flow ran dry"
    return statistics.median(times)


def claim_server_ms(dsn: str, flow: str, batch: int, rounds: int = 30) -> float:
    """Median server-side execution time of one claim (EXPLAIN ANALYZE, rolled back):
    the database's own work, without the client's or the network's."""
    times = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(rounds):
            with conn.transaction():
                plan = conn.execute(
                    "EXPLAIN (ANALYZE, FORMAT JSON) " + queue.query("claim"),
                    {
                        "flow_name": flow,
                        "instance_id": "probe",
                        "batch_size": batch,
                        "lease_seconds": 60,
                    },
                ).fetchone()
                assert plan is not None
                times.append(float(plan[0][0]["Execution Time"]))
                raise psycopg.Rollback()
    return statistics.median(times)


def claim_buffers(dsn: str, flow: str, batch: int) -> int:
    """Shared buffers one claim of ``flow`` touches (EXPLAIN ANALYZE, rolled back): its
    work in pages, free of the machine's noise."""
    touched = 0
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        plan = conn.execute(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + queue.query("claim"),
            {"flow_name": flow, "instance_id": "probe", "batch_size": batch, "lease_seconds": 60},
        ).fetchone()
        assert plan is not None
        top = plan[0][0]["Plan"]
        touched = int(top.get("Shared Hit Blocks", 0)) + int(top.get("Shared Read Blocks", 0))
        raise psycopg.Rollback()
    return touched


# The operator's own read (queue.depth_of_flows, named flows, with recent completions).
OPERATOR_DEPTH = "operator's queue.depth_of_flows"

DEPTH_QUERIES = {
    OPERATOR_DEPTH: OPERATOR_DEPTH,
    "stats of all flows (queue.stats, live queue)": None,
    "pending per flow, claim index only": (
        "SELECT flow_name, count(*) FROM processing_queue WHERE status = 'pending'"
        " GROUP BY flow_name"
    ),
    # Bounded work per flow: an autoscaler needs the depth only up to what it would act
    # on. The flows come from a loose scan of the claim index (one probe per flow).
    "pending per flow capped at 1,000": (
        "WITH RECURSIVE flows AS ("
        " (SELECT flow_name FROM processing_queue WHERE status = 'pending'"
        "   ORDER BY flow_name LIMIT 1)"
        " UNION ALL"
        " SELECT (SELECT q.flow_name FROM processing_queue q"
        "          WHERE q.status = 'pending' AND q.flow_name > flows.flow_name"
        "          ORDER BY q.flow_name LIMIT 1)"
        "   FROM flows WHERE flows.flow_name IS NOT NULL)"
        " SELECT f.flow_name, c.n FROM flows f, LATERAL (SELECT count(*) AS n FROM"
        "  (SELECT 1 FROM processing_queue q WHERE q.status = 'pending'"
        "    AND q.flow_name = f.flow_name LIMIT 1000) x) c"
        " WHERE f.flow_name IS NOT NULL"
    ),
}


def depth_read(dsn: str, sql: str | None, rounds: int) -> tuple[float, int]:
    times, flows = [], 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(rounds):
            started = time.perf_counter()
            if sql == OPERATOR_DEPTH:
                names = [f"busy-{f}" for f in range(10)] + [f"idle-{f}" for f in range(1, 991)]
                flows = len(queue.depth_of_flows(conn, names, 60.0))
            elif sql is None:
                flows = len(queue.stats(conn, None, completed=False))
            else:
                flows = len(conn.execute(sql).fetchall())
            times.append(time.perf_counter() - started)
    return statistics.median(times), flows


def fill_flows(dsn: str, flows: int, per_flow: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO processing_queue (flow_name, payload)"
            " SELECT 'idle-' || f, jsonb_build_object('n', n)"
            " FROM generate_series(1, %s) f, generate_series(1, %s) n",
            (flows, per_flow),
        )
        conn.execute("VACUUM ANALYZE processing_queue")


# -- retention -----------------------------------------------------------------------------


def fill_history(dsn: str, count: int, days: int) -> None:
    """``count`` completed records, completed evenly over the last ``days`` days, in
    completion order (as completions append them)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO processing_history (id, flow_name, payload, claimed_at, completed_at,"
            " created_at)"
            " SELECT -g, 'flow-' || (g %% 20), jsonb_build_object('n', g, 'pad', 'xxxxxxxxxxxx'),"
            "        t, t, t"
            "   FROM generate_series(1, %(n)s) g,"
            "        LATERAL (SELECT (now() AT TIME ZONE 'UTC')"
            "                 - make_interval(secs => %(span)s * (1 - g::float8 / %(n)s))) AS s(t)",
            {"n": count, "span": days * 86400.0},
        )
        conn.execute("VACUUM ANALYZE processing_history")


def steady_claims(dsn: str, stop: threading.Event, counter: list[int]) -> None:
    """Two claim loops at batch 50, counting completions into ``counter[0]``."""
    lock = threading.Lock()

    def loop(index: int) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            got = queue.claim(conn, "steady", f"s{index}", 50, 60)
            while got and not stop.is_set():
                got = queue.complete_and_claim(conn, got, "steady", f"s{index}", 50, 60)
                with lock:
                    counter[0] += len(got)

    loops = [threading.Thread(target=loop, args=(i,)) for i in range(2)]
    for t in loops:
        t.start()
    for t in loops:
        t.join()


WINDOW = 1.5  # seconds per claim-rate window
MAX_PAIRS = 15


def measure_retention(dsn: str, history: int) -> dict[str, float]:
    """Claims run throughout; cleanup runs in alternate windows (paused between them), so
    each window with cleanup has a neighbour without it under the same machine load."""
    fill_history(dsn, history, days=30)
    size = history_bytes_per_million(dsn)
    enqueue(dsn, "steady", 2_000_000 if history > 2_000_000 else 1_000_000)
    stop, active, finished = threading.Event(), threading.Event(), threading.Event()
    counter = [0]
    batches: list[float] = []
    deleted = [0]

    def cleanup() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for batch in queue.cleanup_completed_batches(conn, 22.5 * 86400):
                batches.append(batch.seconds)
                deleted[0] += batch.deleted
                active.wait()
        finished.set()

    claimer = threading.Thread(target=steady_claims, args=(dsn, stop, counter))
    claimer.start()
    cleaner = threading.Thread(target=cleanup)
    with_cleanup: list[float] = []
    without: list[float] = []
    try:
        time.sleep(2 * WINDOW)  # warm-up
        cleaner.start()
        # Claims are watched over the first MAX_PAIRS window pairs (the steady flow holds
        # enough for them); the rest of the cleanup runs unwatched.
        while not finished.is_set() and len(with_cleanup) < MAX_PAIRS:
            for on in (False, True):
                if on:
                    active.set()
                else:
                    active.clear()
                before, started = counter[0], time.perf_counter()
                time.sleep(WINDOW)
                rate = (counter[0] - before) / (time.perf_counter() - started)
                if on and finished.is_set():
                    break  # a window cleanup did not fill
                assert rate > 0, "the steady flow ran dry"
                (with_cleanup if on else without).append(rate)
        stop.set()
        active.set()
        cleaner.join()
        cleaning_seconds = sum(batches)
    finally:
        active.set()
        stop.set()
        claimer.join()
        cleaner.join()
    pairs = list(zip(without, with_cleanup, strict=False))
    return {
        "deleted": deleted[0],
        "seconds": cleaning_seconds,
        "batches": len(batches),
        "longest_batch": max(batches),
        "median_batch": statistics.median(batches),
        "before": statistics.median(without),
        "during": statistics.median(with_cleanup),
        "ratio": statistics.median(b / a for a, b in pairs),
        "windows": len(pairs),
        "bytes_per_million": size,
    }


def history_bytes_per_million(dsn: str) -> float:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_total_relation_size('processing_history')::float8"
            " / greatest(count(*), 1) * 1e6 FROM processing_history"
        ).fetchone()
    assert row is not None
    return float(row[0])


# -- main ----------------------------------------------------------------------------------


def timed(label: str, fn: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    value = fn()
    print(f"  ({label}: {time.perf_counter() - started:.0f}s)", file=sys.stderr)
    return value


def curve(
    pg: ThrowawayPostgres,
    ff: str,
    pq: str,
    ids_dir: Path,
    loop_counts: list[int],
    curve_records: int,
    repeats: int,
    bounced: str,
) -> None:
    print(f"\n1. claim loops on one flow, batch 10, {curve_records:,} no-op records")
    print(
        f"  {'loops':>5} {'flowfleet rec/s':>16} {'PgQueuer jobs/s':>16} {'ratio':>7}"
        f" {'via PgBouncer rec/s':>20} {'ratio to direct':>16}"
    )
    for loops in loop_counts:
        ours, theirs, pooled = [], [], []
        for _ in range(repeats):
            ours.append(flowfleet_drain(pg, ff, curve_records, loops, 10, ids_dir)[0])
            theirs.append(pgqueuer_drain(pq, curve_records, loops, 10))
            if loops >= 50:
                pooled.append(
                    flowfleet_drain(pg, bounced, curve_records, loops, 10, ids_dir, False)[0]
                )
        ratio = statistics.median(a / b for a, b in zip(ours, theirs, strict=True))
        line = (
            f"  {loops:>5} {statistics.median(ours):>16,.0f}"
            f" {statistics.median(theirs):>16,.0f} {ratio:>6.2f}x"
        )
        if pooled:
            gain = statistics.median(b / a for a, b in zip(ours, pooled, strict=True))
            line += f" {statistics.median(pooled):>20,.0f} {gain:>15.2f}x"
        print(line)
    print("  every record claimed exactly once at every loop count and path (checked);")
    print(f"  PgBouncer: transaction mode, {POOL} server connections, statements unprepared")

    print("\n   EXPLAIN ANALYZE of one claim (batch 10) while 200 loops drain:")
    for line in timed("explain", lambda: explain_claim_under_contention(pg, ff, ids_dir, 200, 10)):
        print(f"     {line}")


def per_core(
    pg: ThrowawayPostgres, ff: str, ids_dir: Path, curve_records: int, repeats: int
) -> None:
    print("\n2. records per PostgreSQL CPU-second (4 loops, server processes' CPU time)")
    rates: dict[int, float] = {}
    for batch in (10, 50, 200):
        runs = [
            flowfleet_drain(pg, ff, curve_records * 2, 4, batch, ids_dir) for _ in range(repeats)
        ]
        rates[batch] = statistics.median(curve_records * 2 / cpu for _, cpu in runs)
        rate = statistics.median(r for r, _ in runs)
        common.row(
            f"batch {batch}: records per server CPU-second",
            f"{rates[batch]:,.0f}",
            f"(wall {rate:,.0f} rec/s)",
        )


def prepares(pg: ThrowawayPostgres, ff: str, ids_dir: Path, records: int, repeats: int) -> None:
    print("\n3. server-side prepared statements (1 loop, batch 10: planning weighs most)")
    prepared, unprepared, ratios = [], [], []
    for _ in range(max(repeats, 3)):
        rate_p, cpu_p = flowfleet_drain(pg, ff, records, 1, 10, ids_dir, True)
        rate_u, cpu_u = flowfleet_drain(pg, ff, records, 1, 10, ids_dir, False)
        prepared.append(rate_p)
        unprepared.append(rate_u)
        ratios.append(cpu_u / cpu_p)
    common.row("prepared (psycopg default), records/s", f"{statistics.median(prepared):,.0f}")
    common.row("unprepared (prepare_threshold=None)", f"{statistics.median(unprepared):,.0f}")
    common.row(
        "wall-clock ratio unprepared / prepared",
        f"{statistics.median(u / p for u, p in zip(unprepared, prepared, strict=True)):.2f}x",
    )
    common.row("server CPU per record, unprepared / prepared", f"{statistics.median(ratios):.2f}x")


def many_flows(pg: ThrowawayPostgres, full: bool) -> None:
    print("\n4. 1,000 flows, 10 busy (batch 10 round trips on one busy flow)")
    lone = common.create_database(pg, "scale_lone", flowfleet_schema=True)
    crowd = common.create_database(pg, "scale_crowd", flowfleet_schema=True)
    per_idle = 1_000 if full else 200
    for dsn in (lone, crowd):
        with psycopg.connect(dsn, autocommit=True) as conn:
            for f in range(10):
                queue.enqueue(conn, f"busy-{f}", ({"n": n} for n in range(20_000)))
    timed("fill", lambda: fill_flows(crowd, 990, per_idle))
    for prepare in (True, False):
        alone, crowded = [], []
        for _ in range(5):
            probed = "busy-0" if prepare else "busy-2"  # 20,000 records last one mode
            alone.append(claim_round_trips(lone, probed, 10, 200, prepare))
            crowded.append(claim_round_trips(crowd, probed, 10, 200, prepare))
        how = "prepared" if prepare else "unprepared"
        common.row(
            f"{how}: one complete+claim, busy flow alone (ms)",
            f"{statistics.median(alone) * 1e3:.2f}",
        )
        common.row(
            f"{how}: the same beside 990 flows x {per_idle:,} pending (ms)",
            f"{statistics.median(crowded) * 1e3:.2f}",
        )
        common.row(
            f"{how}: ratio crowded / alone",
            f"{statistics.median(c / a for c, a in zip(crowded, alone, strict=True)):.2f}x",
        )
    common.row(
        "server execution of one claim, alone / crowded (ms)",
        f"{claim_server_ms(lone, 'busy-1', 10):.3f} / {claim_server_ms(crowd, 'busy-1', 10):.3f}",
    )
    common.row(
        "pages one claim touches, alone / crowded",
        f"{claim_buffers(lone, 'busy-1', 10)} / {claim_buffers(crowd, 'busy-1', 10)}",
    )
    for label, sql in DEPTH_QUERIES.items():
        took, flows = depth_read(
            crowd, label if sql is None and label == OPERATOR_DEPTH else sql, 5
        )
        common.row(f"depth of all {flows} flows: {label} (ms)", f"{took * 1e3:.1f}")


def retention(pg: ThrowawayPostgres, history: int) -> None:
    print(f"\n5. retention: {history:,} completed records over 30 days, delete the oldest quarter")
    hist = common.create_database(pg, "scale_history", flowfleet_schema=True)
    result = timed("retention", lambda: measure_retention(hist, history))
    common.row(
        "history on disk per million records (MB)", f"{result['bytes_per_million'] / 1e6:.0f}"
    )
    common.row("deleted", f"{result['deleted']:,.0f}")
    common.row(
        "cleanup transactions summed (s; paced 1:9, so wall ~10x)", f"{result['seconds']:.1f}"
    )
    common.row("cleanup transactions (batches of 5,000)", f"{result['batches']:,.0f}")
    common.row(
        "median / longest cleanup transaction (ms)",
        f"{result['median_batch'] * 1e3:.0f} / {result['longest_batch'] * 1e3:.0f}",
    )
    common.row(
        f"claims without cleanup (rec/s, 2 loops, {WINDOW} s windows)", f"{result['before']:,.0f}"
    )
    common.row("claims while cleanup runs (rec/s)", f"{result['during']:,.0f}")
    common.row(
        f"ratio with / without, median of {result['windows']} window pairs",
        f"{result['ratio']:.2f}x",
        "target >= 0.90x",
    )


def server_connections(admin_dsn: str, dbname: str) -> int:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (dbname,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def worker_connections(pg: ThrowawayPostgres, dsn: str, dbname: str, concurrency: int) -> int:
    """Server connections of the database while one idle worker runs (steady state)."""
    from flowfleet.workercmd import worker_command

    env = {**os.environ, "POD_NAME": f"conns-{concurrency}", "PYTHONPATH": str(HERE)}
    env.pop("PREFECT_ENVIRONMENT", None)
    command = worker_command(
        "conns",
        "processors:noop",
        dsn=dsn,
        runner="plain",
        concurrency=concurrency,
        poll_seconds=0.2,
        log_format="json",
    )
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(4)  # started, claimed (nothing), listening, keeper ticked
        return server_connections(pg.dsn(), dbname)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def connections(pg: ThrowawayPostgres, bouncer: ThrowawayPgBouncer) -> None:
    print("\n6. server connections of one idle plain worker (pg_stat_activity)")
    dsn = common.create_database(pg, "scale_conns", flowfleet_schema=True)
    for concurrency in (1, 4, 16):
        direct = worker_connections(pg, dsn, "scale_conns", concurrency)
        pooled = worker_connections(pg, bouncer.dsn("scale_conns"), "scale_conns", concurrency)
        common.row(
            f"concurrency {concurrency}: direct / through PgBouncer",
            f"{direct} / {pooled}",
            f"(PgBouncer keeps at most {POOL} per database)",
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the default: under 2 minutes")
    size.add_argument("--full", action="store_true", help="the full figures (tens of minutes)")
    parser.add_argument(
        "--sections", default="1,2,3,4,5,6", help="which of the numbered parts to run"
    )
    args = parser.parse_args(argv)
    sections = {int(x) for x in args.sections.split(",")}
    full = bool(args.full)
    loop_counts = [1, 2, 5, 10, 20, 50, 100, 200] if full else [1, 20, 200]
    curve_records = 20_000 if full else 8_000
    repeats = 3 if full else 1
    history = 10_000_000 if full else 1_000_000

    ids_dir = Path(os.environ.setdefault("BENCH_IDS_DIR", "/tmp/flowfleet-bench-ids"))
    ids_dir.mkdir(parents=True, exist_ok=True)
    pg = ThrowawayPostgres(durable=True, max_connections=300).start()
    bouncer = ThrowawayPgBouncer(pg, pool_size=POOL)
    try:
        bouncer.start()
        ff = common.create_database(pg, "scale_ff", flowfleet_schema=True)
        pq = common.create_database(pg, "scale_pq", flowfleet_schema=False)
        pgqueuer_side.install(pq)
        flowfleet_drain(pg, ff, 2_000, 2, 10, ids_dir)  # warm-up
        pgqueuer_drain(pq, 2_000, 2, 10)

        if 1 in sections:
            curve(pg, ff, pq, ids_dir, loop_counts, curve_records, repeats, bouncer.dsn("scale_ff"))
        if 2 in sections:
            per_core(pg, ff, ids_dir, curve_records, repeats)
        if 3 in sections:
            prepares(pg, ff, ids_dir, curve_records, repeats)
        if 4 in sections:
            many_flows(pg, full)
        if 5 in sections:
            retention(pg, history)
        if 6 in sections:
            connections(pg, bouncer)
    finally:
        bouncer.stop()
        pg.stop()


if __name__ == "__main__":
    mp.set_start_method("spawn", force=True)
    main()

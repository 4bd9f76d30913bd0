"""Queue core, side by side with PgQueuer on the same PostgreSQL in the same run.

    make bench            # or: .venv/bin/python bench/bench_queue.py --records 50000

1. Drain N no-op records with 2 processes at batch 50: flowfleet's claim/complete path
   against PgQueuer (asyncpg, its own schema). Target: flowfleet >= 2.0x PgQueuer.
2. The same drain on a second database holding 1,000,000 completed records, interleaved
   with the empty one. Target: >= 0.9x.
3. Bulk enqueue through add_records_to_queue. Target: >= 100,000 records/s.
Each figure is the median of --repeats runs; contenders alternate within a repeat.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import pgqueuer_side
from flowfleet import queue
from flowfleet.database import DatabaseManager
from flowfleet.distributed import DistributedProcessor

FLOW = "bench"


def flowfleet_drain(dsn: str, batch_size: int, name: str, *, ready: Any, go: Any) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        ready.set()
        go.wait()
        batch = queue.claim(conn, FLOW, name, batch_size, 60)
        while batch:
            batch = queue.complete_and_claim(conn, batch, FLOW, name, batch_size, 60)


def enqueue_flowfleet(dsn: str, count: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        queue.enqueue(conn, FLOW, ({"n": i} for i in range(count)))
        conn.execute("VACUUM ANALYZE processing_queue")


def drain_flowfleet(dsn: str, records: int, procs: int, batch: int) -> float:
    enqueue_flowfleet(dsn, records)
    seconds = common.run_processes(
        flowfleet_drain, [(dsn, batch, f"bench-{i}") for i in range(procs)]
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        left = conn.execute(
            "SELECT count(*) FROM processing_queue WHERE flow_name = %s", (FLOW,)
        ).fetchone()
    assert left is not None and left[0] == 0, f"flowfleet left {left} records"
    return records / seconds


def drain_pgqueuer(dsn: str, records: int, procs: int, batch: int) -> float:
    pgqueuer_side.enqueue(dsn, records)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE pgqueuer")
    seconds = common.run_processes(pgqueuer_side.drain, [(dsn, batch)] * procs)
    with psycopg.connect(dsn, autocommit=True) as conn:
        left = conn.execute("SELECT count(*) FROM pgqueuer").fetchone()
    assert left is not None and left[0] == 0, f"PgQueuer left {left} jobs"
    return records / seconds


def fill_history(dsn: str, count: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO processing_history (id, flow_name, payload, claimed_at, completed_at,"
            " created_at) SELECT -g, %s, jsonb_build_object('n', g), LOCALTIMESTAMP,"
            " LOCALTIMESTAMP, LOCALTIMESTAMP FROM generate_series(1, %s) g",
            (FLOW, count),
        )
        conn.execute("VACUUM ANALYZE processing_history")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--history", type=int, default=1_000_000)
    parser.add_argument("--enqueue-records", type=int, default=200_000)
    args = parser.parse_args()

    pg = common.server()
    try:
        ff_dsn = common.create_database(pg, "bench_flowfleet", flowfleet_schema=True)
        loaded_dsn = common.create_database(pg, "bench_loaded", flowfleet_schema=True)
        fill_history(loaded_dsn, args.history)
        pq_dsn = common.create_database(pg, "bench_pgqueuer", flowfleet_schema=False)
        pgqueuer_side.install(pq_dsn)
        shape = (args.records, args.processes, args.batch_size)
        # Warm both once so neither pays first-touch costs inside a timed run.
        drain_flowfleet(ff_dsn, 2_000, args.processes, args.batch_size)
        drain_pgqueuer(pq_dsn, 2_000, args.processes, args.batch_size)
        drain_flowfleet(loaded_dsn, 2_000, args.processes, args.batch_size)

        # Interleaved, so a burst of load from elsewhere on the machine hits all three alike.
        ours, theirs, loaded = [], [], []
        for _ in range(args.repeats):
            ours.append(drain_flowfleet(ff_dsn, *shape))
            theirs.append(drain_pgqueuer(pq_dsn, *shape))
            loaded.append(drain_flowfleet(loaded_dsn, *shape))

        db = DatabaseManager("bench", connection_string=ff_dsn)
        processor = DistributedProcessor(db)
        rates = []
        for _ in range(args.repeats):
            records = [
                {"survey_id": f"S-{i}", "customer_id": f"C-{i}"}
                for i in range(args.enqueue_records)
            ]
            started = time.perf_counter()
            processor.add_records_to_queue("bench_enqueue", records)
            rates.append(args.enqueue_records / (time.perf_counter() - started))
        db.close()
    finally:
        pg.stop()

    ff, pq, ld, enq = (common.median(v) for v in (ours, theirs, loaded, rates))
    # Ratios within a repeat, then their median: contenders of one repeat share the
    # machine's mood, so per-repeat ratios are steadier than a ratio of medians.
    vs_pgqueuer = common.median([a / b for a, b in zip(ours, theirs, strict=True)])
    vs_empty = common.median([a / b for a, b in zip(loaded, ours, strict=True)])
    print(
        f"\nqueue core: {args.records} no-op records, {args.processes} processes, "
        f"batch {args.batch_size}, median of {args.repeats}"
    )
    common.row("flowfleet claim/complete (records/s)", f"{ff:,.0f}")
    common.row("PgQueuer 1.6, asyncpg (jobs/s)", f"{pq:,.0f}")
    common.row("ratio flowfleet / PgQueuer", f"{vs_pgqueuer:.2f}x", "target >= 2.0x")
    common.row(f"flowfleet with {args.history:,} completed stored (records/s)", f"{ld:,.0f}")
    common.row("ratio loaded / empty", f"{vs_empty:.2f}x", "target >= 0.9x")
    common.row("bulk enqueue, add_records_to_queue (records/s)", f"{enq:,.0f}", "target >= 100,000")
    print(
        "  runs (records/s): flowfleet",
        [round(v) for v in ours],
        "PgQueuer",
        [round(v) for v in theirs],
        "loaded",
        [round(v) for v in loaded],
    )


if __name__ == "__main__":
    main()

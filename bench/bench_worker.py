"""Worker runtime, side by side with its anchors in one run.

    make bench            # or: .venv/bin/python bench/bench_worker.py

1. Prefect runner (``flowfleet worker --runner prefect``) at batch 50 against the seed's
   pattern (a Prefect flow per claimed batch, a task per record, called in a loop), both
   on one local Prefect server and one database. Target: >= 10x.
2. Plain runner through real ``flowfleet worker`` processes (2, batch 50) against
   PgQueuer draining the same number of jobs with 2 processes. Target: >= 2x.
3. Enqueue-to-start latency on an idle worker (NOTIFY wake-up): median and p99; target
   median < 20 ms.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psycopg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import pgqueuer_side  # noqa: E402
from bench_queue import drain_pgqueuer  # noqa: E402
from flowfleet.database import DatabaseManager  # noqa: E402
from flowfleet.distributed import DistributedProcessor  # noqa: E402
from flowfleet.throwaway import ThrowawayPrefect, free_port  # noqa: E402
from flowfleet.workercmd import Option, worker_command  # noqa: E402

FLOW = "bench"


def start_worker(
    dsn: str, name: str, runner: str, batch: int, extra_env: dict[str, str], **options: Option
) -> subprocess.Popen[bytes]:
    env = {**os.environ, **extra_env, "POD_NAME": name, "PYTHONPATH": str(HERE)}
    env.pop("PREFECT_ENVIRONMENT", None)
    command = worker_command(
        FLOW,
        extra_env.get("ENTRYPOINT", "processors:noop"),
        dsn=dsn,
        runner=runner,
        batch_size=batch,
        log_format="json",
        **options,
    )
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_http(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:  # noqa: S310 - loopback
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} never answered 200")


def wait_drained(dsn: str, timeout: float = 600.0) -> float:
    """Seconds until the flow has nothing pending or processing, polled every 5 ms."""
    started = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.perf_counter() - started < timeout:
            # EXISTS stops at the first row: a count(*) over the backlog every 5 ms would
            # itself load the server the workers are measured on.
            row = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM processing_queue WHERE flow_name = %s)", (FLOW,)
            ).fetchone()
            if row is not None and not row[0]:
                return time.perf_counter() - started
            time.sleep(0.005)
    raise RuntimeError("queue not drained in time")


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(60)


def enqueue(dsn: str, count: int, payload: Any = None) -> None:
    db = DatabaseManager("bench", connection_string=dsn)
    DistributedProcessor(db).add_records_to_queue(FLOW, [payload or {"n": i} for i in range(count)])
    db.close()


def workers_drain(
    dsn: str, records: int, procs: int, batch: int, runner: str, env: dict[str, str]
) -> float:
    """Rate of real worker processes, idle and listening before the records arrive, from
    the enqueue's commit to an empty queue."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        # As bench_queue does for both contenders: each repeat starts without the last
        # repeat's dead rows.
        conn.execute("VACUUM ANALYZE processing_queue")
    ports = [free_port() for _ in range(procs)]
    workers = [
        start_worker(dsn, f"w{i}", runner, batch, env, http_port=port)
        for i, port in enumerate(ports)
    ]
    try:
        for port in ports:
            wait_http(f"http://127.0.0.1:{port}/readyz")
        enqueue(dsn, records)
        return records / wait_drained(dsn)
    finally:
        stop(workers)


def seed_style_rate(dsn: str, records: int, batch: int) -> float:
    """The seed's pattern, as its users write it: a flow per batch, a task per record."""
    from prefect import flow, task

    db = DatabaseManager("bench-seed", connection_string=dsn)
    processor = DistributedProcessor(db)

    @task
    def process_record(record: dict[str, Any]) -> None:
        processor.mark_record_completed(record["id"])

    @flow(name="seed-style-batch")
    def seed_batch(flow_name: str, batch_size: int) -> int:
        claimed = processor.claim_records_batch(flow_name, batch_size)
        for record in claimed:
            process_record(record)
        return len(claimed)

    enqueue(dsn, records)
    started = time.perf_counter()
    while seed_batch(FLOW, batch):
        pass
    seconds = time.perf_counter() - started
    db.close()
    return records / seconds


def latency(dsn: str, samples: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        stamps = Path(tmp) / "stamps"
        port = free_port()
        env = {"FLOWFLEET_BENCH_STAMPS": str(stamps), "ENTRYPOINT": "processors:stamp"}
        worker = start_worker(dsn, "idle", "plain", 50, env, http_port=port, poll_seconds=60)
        try:
            wait_http(f"http://127.0.0.1:{port}/readyz")
            db = DatabaseManager("bench-latency", connection_string=dsn)
            processor = DistributedProcessor(db)
            for i in range(samples):
                time.sleep(0.05)  # the worker is idle again, waiting on LISTEN
                processor.add_records_to_queue(FLOW, [{"sent": time.time(), "i": i}])
            wait_drained(dsn)
            db.close()
        finally:
            stop([worker])
        pairs = [line.split() for line in stamps.read_text().splitlines()]
    return sorted((float(b) - float(a)) * 1000 for a, b in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefect-records", type=int, default=3_000)
    parser.add_argument("--seed-records", type=int, default=300)
    parser.add_argument("--latency-samples", type=int, default=200)
    args = parser.parse_args()

    pg = common.server()
    prefect_server = None
    try:
        ff_dsn = common.create_database(pg, "bench_worker", flowfleet_schema=True)
        pq_dsn = common.create_database(pg, "bench_pgqueuer", flowfleet_schema=False)
        pgqueuer_side.install(pq_dsn)

        ours, theirs = [], []
        for _ in range(args.repeats):
            ours.append(workers_drain(ff_dsn, args.records, 2, args.batch_size, "plain", {}))
            theirs.append(drain_pgqueuer(pq_dsn, args.records, 2, args.batch_size))

        lat = latency(ff_dsn, args.latency_samples)

        prefect_server = ThrowawayPrefect().start()
        os.environ.update(prefect_server.env())
        seed_style_rate(ff_dsn, 50, args.batch_size)  # registers the flow, warms the server
        prefect_ours, seed = [], []
        for _ in range(args.repeats):
            prefect_ours.append(
                workers_drain(ff_dsn, args.prefect_records, 1, args.batch_size, "prefect", {})
            )
            seed.append(seed_style_rate(ff_dsn, args.seed_records, args.batch_size))
    finally:
        if prefect_server is not None:
            prefect_server.drain_client()
            prefect_server.stop()
        pg.stop()

    ratio = [a / b for a, b in zip(ours, theirs, strict=True)]
    pratio = [a / b for a, b in zip(prefect_ours, seed, strict=True)]
    print(f"\nworker runtime: batch {args.batch_size}, median of {args.repeats}")
    common.row("prefect runner, 1 worker (records/s)", f"{common.median(prefect_ours):,.1f}")
    common.row(
        "seed pattern: flow per batch, task per record (records/s)", f"{common.median(seed):,.1f}"
    )
    common.row(
        "ratio prefect runner / seed pattern", f"{common.median(pratio):.1f}x", "target >= 10x"
    )
    common.row(
        f"plain runner, 2 worker processes, {args.records:,} (records/s)",
        f"{common.median(ours):,.0f}",
    )
    common.row("PgQueuer 1.6, 2 processes (jobs/s)", f"{common.median(theirs):,.0f}")
    common.row("ratio plain workers / PgQueuer", f"{common.median(ratio):.2f}x", "target >= 2x")
    common.row(
        "enqueue-to-start, idle worker: median (ms)",
        f"{statistics.median(lat):.1f}",
        "target < 20 ms",
    )
    common.row(
        "enqueue-to-start, idle worker: p99 (ms)",
        f"{lat[min(len(lat) - 1, int(len(lat) * 0.99))]:.1f}",
    )
    print(
        "  runs: prefect",
        [round(v, 1) for v in prefect_ours],
        "seed",
        [round(v, 1) for v in seed],
        "plain",
        [round(v) for v in ours],
        "PgQueuer",
        [round(v) for v in theirs],
    )


if __name__ == "__main__":
    main()

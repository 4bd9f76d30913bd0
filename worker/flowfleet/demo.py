"""``make demo``: 20,000 records, 4 real ``flowfleet worker`` processes, one SIGKILLed.

Uses ``FLOWFLEET_DSN`` when set, else a throwaway PostgreSQL. Each worker writes its
result in the transaction that completes the record, so the summary can count executions
exactly: processed, duplicates (0), records recovered from the killed worker, records/s.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from typing import Any

import psycopg
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flowfleet.database import DatabaseManager
from flowfleet.distributed import DistributedProcessor
from flowfleet.migrate import migrate
from flowfleet.throwaway import ThrowawayPostgres

FLOW = "survey_processor"
RECORDS = int(os.environ.get("FLOWFLEET_DEMO_RECORDS", "20000"))
WORKERS = 4
LEASE_SECONDS = 4
console = Console()


def survey_result(payload: dict[str, Any], conn: psycopg.Connection) -> None:
    """The demo's processor: score a survey and store the score with the completion."""
    time.sleep(0.0005)  # stands in for the real work of an RPA step
    conn.execute(
        "INSERT INTO survey_results (survey_id, score, processed_by) VALUES (%s, %s, %s)",
        (payload["survey_id"], len(payload["answers"]), os.environ.get("POD_NAME")),
    )


def start_worker(dsn: str, name: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "FLOWFLEET_DSN": dsn, "POD_NAME": name}
    runner = os.environ.get("FLOWFLEET_DEMO_RUNNER", "plain")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flowfleet.cli",
            "worker",
            FLOW,
            "--entrypoint",
            "flowfleet.demo:survey_result",
            "--runner",
            runner,
            "--lease-seconds",
            str(LEASE_SECONDS),
            "--http-port",
            "0",
            "--exit-when-empty",
            "--log-format",
            "json",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def run(dsn: str) -> int:
    db = DatabaseManager("demo", connection_string=dsn)
    with db.connection() as conn:
        migrate(conn)
        conn.execute(
            "CREATE TABLE IF NOT EXISTS survey_results (survey_id text, score int,"
            " processed_by text)"
        )
        conn.execute("TRUNCATE survey_results")
    processor = DistributedProcessor(db)
    records = [
        {
            "survey_id": f"SURV-{i:05d}",
            "customer_id": f"CUST-{i % 997:03d}",
            "answers": ["yes"] * (i % 7 + 1),
        }
        for i in range(RECORDS)
    ]
    console.print(
        f"[bold]flowfleet demo[/]: {RECORDS:,} records, {WORKERS} workers "
        f"(flow {FLOW!r}, database {db.location})"
    )
    started = time.perf_counter()
    processor.add_records_to_queue(FLOW, records)
    # Workers exit once the flow has nothing pending or running, so they start after.
    workers = {
        f"demo-worker-{i}": start_worker(dsn, f"demo-worker-{i}") for i in range(1, WORKERS + 1)
    }
    victim, held = "demo-worker-2", 0
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bar = progress.add_task("processing", total=RECORDS)
        while any(p.poll() is None for p in workers.values()):
            status = processor.get_queue_status(FLOW)
            progress.update(
                bar,
                completed=status["completed_records"],
                description=f"processing ({status['processing_records']} in flight)",
            )
            if not held and status["completed_records"] >= RECORDS // 3:
                workers[victim].send_signal(signal.SIGKILL)
                workers[victim].wait()
                with db.connection() as conn:
                    row = conn.execute(
                        "SELECT count(*) FROM processing_queue WHERE flow_instance_id = %s"
                        " AND status = 'processing'",
                        (victim,),
                    ).fetchone()
                held = int(row[0]) if row else 0
                progress.console.print(
                    f"[red]SIGKILL {victim}[/]: {held} records in flight; they come back "
                    f"when its {LEASE_SECONDS}s lease runs out"
                )
            time.sleep(0.2)
        progress.update(bar, completed=processor.get_queue_status(FLOW)["completed_records"])
    elapsed = time.perf_counter() - started
    return summarise(db, processor, victim, held, elapsed)


def summarise(
    db: DatabaseManager, processor: DistributedProcessor, victim: str, held: int, elapsed: float
) -> int:
    status = processor.get_queue_status(FLOW)
    with db.connection() as conn:
        row = conn.execute(
            "SELECT count(*), count(*) - count(DISTINCT survey_id) FROM survey_results"
        ).fetchone()
        per_worker = conn.execute(
            "SELECT processed_by, count(*) FROM survey_results GROUP BY 1 ORDER BY 1"
        ).fetchall()
    assert row is not None
    executions, duplicates = int(row[0]), int(row[1])
    ok = status["completed_records"] == RECORDS and duplicates == 0 and executions == RECORDS
    console.print()
    console.print(f"processed   {status['completed_records']:,} of {RECORDS:,}")
    console.print(f"duplicates  {duplicates}")
    console.print(f"recovered   {held} (in flight on {victim} when it was killed)")
    console.print(
        f"left        {status['pending_records']} pending, "
        f"{status['processing_records']} processing, {status['failed_records']} failed"
    )
    console.print(
        f"records/s   {status['completed_records'] / elapsed:,.0f} "
        f"({elapsed:.1f}s, including the {LEASE_SECONDS}s lease wait)"
    )
    console.print("per worker  " + ", ".join(f"{name}: {count:,}" for name, count in per_worker))
    console.print("[bold green]OK[/]" if ok else "[bold red]MISMATCH[/]")
    db.close()
    return 0 if ok else 1


def main() -> int:
    with ExitStack() as stack:
        dsn = os.environ.get("FLOWFLEET_DSN")
        if not dsn:
            pg = stack.enter_context(ThrowawayPostgres())
            dsn = pg.dsn()
        return run(dsn)
    return 1


if __name__ == "__main__":
    sys.exit(main())

"""``make demo``: 20,000 records, 4 real ``flowfleet worker`` processes, one SIGKILLed.

Uses ``FLOWFLEET_DSN`` when set, else a throwaway PostgreSQL. Each worker writes its
result in the transaction that completes the record, so the summary can count executions
exactly: processed, duplicates (0), records recovered from the killed worker, records/s.

The database may be a real one holding real flows, so the demo touches only what it
creates: a flow and a results table named ``flowfleet_demo_<random>`` for this run alone,
counted on their own and removed at the end. Every other row stays as it was found.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from typing import Any

import psycopg
from psycopg import sql
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flowfleet import queue
from flowfleet.database import DatabaseManager
from flowfleet.distributed import DistributedProcessor
from flowfleet.errors import FlowfleetError
from flowfleet.migrate import migrate
from flowfleet.throwaway import ThrowawayPostgres
from flowfleet.workercmd import worker_command

# The workers read the results table's name from here; set per run by ``run``.
TABLE_ENV = "FLOWFLEET_DEMO_TABLE"
RECORDS = int(os.environ.get("FLOWFLEET_DEMO_RECORDS", "20000"))
WORKERS = 4
LEASE_SECONDS = 4
console = Console()


def survey_result(payload: dict[str, Any], conn: psycopg.Connection) -> None:
    """The demo's processor: score a survey and store the score with the completion."""
    time.sleep(0.0005)  # stands in for the real work of an RPA step
    conn.execute(
        sql.SQL("INSERT INTO {} (survey_id, score, processed_by) VALUES (%s, %s, %s)").format(
            sql.Identifier(os.environ[TABLE_ENV])
        ),
        (payload["survey_id"], len(payload["answers"]), os.environ.get("POD_NAME")),
    )


def start_worker(dsn: str, flow: str, name: str) -> subprocess.Popen[bytes]:
    # The flow name doubles as the results table's name: both are this run's alone.
    env = {**os.environ, "FLOWFLEET_DSN": dsn, "POD_NAME": name, TABLE_ENV: flow}
    runner = os.environ.get("FLOWFLEET_DEMO_RUNNER", "plain")
    return subprocess.Popen(
        worker_command(
            flow,
            "flowfleet.demo:survey_result",
            runner=runner,
            lease_seconds=LEASE_SECONDS,
            http_port=0,
            exit_when_empty=True,
            log_format="json",
        ),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def run(dsn: str) -> int:
    flow = f"flowfleet_demo_{secrets.token_hex(4)}"
    db = DatabaseManager("demo", connection_string=dsn)
    workers: dict[str, subprocess.Popen[bytes]] = {}
    with db.connection() as conn:
        migrate(conn)
    try:
        with db.connection() as conn:
            conn.execute(
                sql.SQL("CREATE TABLE {} (survey_id text, score int, processed_by text)").format(
                    sql.Identifier(flow)
                )
            )
        return _run(dsn, db, flow, workers)
    finally:
        for process in workers.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        _remove(db, flow)
        db.close()


def _run(
    dsn: str, db: DatabaseManager, flow: str, workers: dict[str, subprocess.Popen[bytes]]
) -> int:
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
        f"(flow and results table {flow!r}, database {db.location})"
    )
    started = time.perf_counter()
    processor.add_records_to_queue(flow, records)
    # Workers exit once the flow has nothing pending or running, so they start after.
    for i in range(1, WORKERS + 1):
        workers[f"demo-worker-{i}"] = start_worker(dsn, flow, f"demo-worker-{i}")
    victim, held, killed = "demo-worker-2", 0, False
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bar = progress.add_task("processing", total=RECORDS)
        while any(p.poll() is None for p in workers.values()):
            status = processor.get_queue_status(flow)
            progress.update(
                bar,
                completed=status["completed_records"],
                description=f"processing ({status['processing_records']} in flight)",
            )
            if not killed and status["completed_records"] >= RECORDS // 3:
                workers[victim].send_signal(signal.SIGKILL)
                workers[victim].wait()
                killed = True
                with db.connection() as conn:
                    held = sum(
                        int(row["processing_records"])
                        for row in queue.processing_by_instance(conn, flow)
                        if row["instance_id"] == victim
                    )
                progress.console.print(
                    f"[red]SIGKILL {victim}[/]: {held} records in flight; they come back "
                    f"when its {LEASE_SECONDS}s lease runs out"
                )
            time.sleep(0.2)
        progress.update(bar, completed=processor.get_queue_status(flow)["completed_records"])
    elapsed = time.perf_counter() - started
    return summarise(db, processor, flow, victim, held, elapsed)


def summarise(
    db: DatabaseManager,
    processor: DistributedProcessor,
    flow: str,
    victim: str,
    held: int,
    elapsed: float,
) -> int:
    status = processor.get_queue_status(flow)
    table = sql.Identifier(flow)
    with db.connection() as conn:
        row = conn.execute(
            sql.SQL("SELECT count(*), count(*) - count(DISTINCT survey_id) FROM {}").format(table)
        ).fetchone()
        per_worker = conn.execute(
            sql.SQL("SELECT processed_by, count(*) FROM {} GROUP BY 1 ORDER BY 1").format(table)
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
    return 0 if ok else 1


def _remove(db: DatabaseManager, flow: str) -> None:
    """Take back exactly what this run created, so the demo can run again and again on a
    real database without leaving anything behind."""
    try:
        with db.connection() as conn, conn.transaction():
            queue.delete_flow(conn, flow)
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(flow)))
    except (psycopg.Error, FlowfleetError) as exc:
        console.print(f"[red]could not remove the demo's flow and table {flow}[/]: {exc}")
        return
    console.print(f"removed     the demo's records and table ({flow})")


def main() -> int:
    with ExitStack() as stack:
        dsn = os.environ.get("FLOWFLEET_DSN")
        if not dsn:
            pg = stack.enter_context(ThrowawayPostgres())
            dsn = pg.dsn()
        try:
            return run(dsn)
        except FlowfleetError as exc:
            console.print(f"flowfleet demo: {exc}", markup=False)
            return 1
    return 1


if __name__ == "__main__":
    sys.exit(main())

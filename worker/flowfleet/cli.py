"""The ``flowfleet`` command."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import psycopg
import typer

from flowfleet.database import DatabaseManager, redact
from flowfleet.errors import FlowfleetError, InvalidRecordError

app = typer.Typer(
    name="flowfleet",
    help="A fenced PostgreSQL queue for Prefect record-processing flows.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])

DsnOption = Annotated[
    str | None,
    typer.Option(
        "--dsn",
        envvar="FLOWFLEET_DSN",
        show_envvar=True,
        help="PostgreSQL connection string of the queue database.",
    ),
]
DbOption = Annotated[
    str | None,
    typer.Option("--db", help="Named database from the environment (e.g. rpa_db)."),
]


def database(dsn: str | None, db: str | None) -> DatabaseManager:
    if db:
        return DatabaseManager(db)
    if dsn:
        return DatabaseManager("queue", connection_string=dsn)
    return DatabaseManager("rpa_db")


def fail(message: str, code: int = 1) -> None:
    typer.echo(f"flowfleet: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Our errors end the command with their one line and no traceback."""
    try:
        yield
    except FlowfleetError as exc:
        fail(str(exc))
    except psycopg.Error as exc:
        # Anything else the database refuses: its first line, which names no secret.
        lines = str(exc).strip().splitlines()
        fail(f"database error: {redact(lines[0]) if lines else type(exc).__name__}")


def print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


@app.command()
def migrate(dsn: DsnOption = None, db: DbOption = None) -> None:
    """Create or upgrade the queue schema (idempotent; safe to run concurrently)."""
    from flowfleet.migrate import current_version
    from flowfleet.migrate import migrate as run_migrations

    with user_errors():
        target = database(dsn, db)
        with target.connection() as conn:
            applied = run_migrations(conn)
            version = current_version(conn)
    if applied:
        typer.echo(
            f"applied migrations {', '.join(map(str, applied))}; schema at version {version}"
        )
    else:
        typer.echo(f"schema already at version {version}; nothing to do")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _loads(text: str) -> Any:
    # Python's json accepts NaN and Infinity; PostgreSQL's does not.
    return json.loads(text, parse_constant=_reject_constant)


def read_records(source: str) -> list[Any]:
    """JSON lines or one JSON array, from a file or ``-``; errors name the line."""
    text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            value = _loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidRecordError(f"line {exc.lineno}: invalid JSON: {exc.msg}") from None
        except ValueError as exc:
            raise InvalidRecordError(f"invalid JSON: {exc}") from None
        if not isinstance(value, list):
            raise InvalidRecordError("expected a JSON array or JSON lines")
        return value
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = _loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidRecordError(f"line {number}: invalid JSON: {exc.msg}") from None
        except ValueError as exc:
            raise InvalidRecordError(f"line {number}: invalid JSON: {exc}") from None
        if not isinstance(record, dict):
            raise InvalidRecordError(
                f"line {number}: payload must be a JSON object, got {type(record).__name__}"
            )
        records.append(record)
    return records


@app.command()
def enqueue(
    flow: Annotated[str, typer.Argument(help="Flow name the records belong to.")],
    source: Annotated[
        str, typer.Argument(help="File of JSON lines or a JSON array; - for stdin.")
    ] = "-",
    priority: Annotated[int, typer.Option(help="Higher runs first.")] = 0,
    delay: Annotated[float, typer.Option(help="Seconds before the records may run.")] = 0.0,
    dedup_key: Annotated[
        str | None,
        typer.Option(help="Payload field whose value must be unique among live records."),
    ] = None,
    dsn: DsnOption = None,
    db: DbOption = None,
) -> None:
    """Add records to a flow's queue. One bad record rejects the call: nothing is enqueued."""
    from flowfleet.distributed import DistributedProcessor

    with user_errors():
        try:
            records = read_records(source)
        except OSError as exc:
            raise InvalidRecordError(f"cannot read {source}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise InvalidRecordError(f"cannot read {source}: not UTF-8 text") from None
        processor = DistributedProcessor(database(dsn, db))
        count = processor.add_records_to_queue(
            flow, records, priority=priority, delay_seconds=delay, dedup_key=dedup_key
        )
    typer.echo(f"enqueued {count} records for {flow}")


def _status_table(status: dict[str, Any], flow: str | None) -> Any:
    from rich.table import Table

    keys = ("pending_records", "processing_records", "completed_records", "failed_records")
    table = Table("flow", "pending", "processing", "completed", "failed", "total")
    rows = {flow: status} if flow else status["by_flow"]
    for name, counts in rows.items():
        table.add_row(name, *(str(counts[k]) for k in keys), str(counts["total_records"]))
    if not flow and len(rows) != 1:
        table.add_row(
            "[bold]all", *(f"[bold]{status[k]}" for k in keys), f"[bold]{status['total_records']}"
        )
    return table


@app.command()
def status(
    flow: Annotated[str | None, typer.Argument(help="One flow; all flows when omitted.")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print get_queue_status() as JSON.")
    ] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh until interrupted.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch.")] = 2.0,
    dsn: DsnOption = None,
    db: DbOption = None,
) -> None:
    """Queue depth per status, for one flow or all."""
    from rich.console import Console
    from rich.live import Live

    from flowfleet.distributed import DistributedProcessor

    with user_errors():
        processor = DistributedProcessor(database(dsn, db))
        if as_json and not watch:
            print_json(processor.get_queue_status(flow))
            return
        console = Console()
        if not watch:
            console.print(_status_table(processor.get_queue_status(flow), flow))
            return
        try:
            with Live(console=console, auto_refresh=False) as live:
                while True:
                    current = processor.get_queue_status(flow)
                    live.update(
                        json.dumps(current, sort_keys=True)
                        if as_json
                        else _status_table(current, flow),
                        refresh=True,
                    )
                    time.sleep(interval)
        except KeyboardInterrupt:
            pass


@app.command()
def cleanup(
    timeout_hours: Annotated[
        float | None, typer.Option(help="Also release claims older than this (hours).")
    ] = None,
    completed_older_than_hours: Annotated[
        float | None, typer.Option(help="Delete completed records older than this (hours).")
    ] = None,
    dsn: DsnOption = None,
    db: DbOption = None,
) -> None:
    """Return orphaned records (expired leases) to the queue; optionally prune history."""
    from flowfleet.distributed import DistributedProcessor

    with user_errors():
        processor = DistributedProcessor(database(dsn, db))
        released = processor.cleanup_orphaned_records(timeout_hours)
        typer.echo(f"released {released} orphaned records")
        if completed_older_than_hours is not None:
            deleted = processor.cleanup_completed_records(completed_older_than_hours)
            typer.echo(f"deleted {deleted} completed records")


@app.command()
def health(
    as_json: Annotated[bool, typer.Option("--json")] = False,
    dsn: DsnOption = None,
    db: DbOption = None,
) -> None:
    """Database reachability, schema version and queue totals; exit 1 when unhealthy."""
    from flowfleet.distributed import DistributedProcessor

    with user_errors():
        report = DistributedProcessor(database(dsn, db)).health_check()
    if as_json:
        print_json(report)
    else:
        typer.echo(f"status: {report['status']}")
        for name, info in report["databases"].items():
            typer.echo(
                f"database {name}: {info['status']}"
                + (f" ({info['error']})" if "error" in info else "")
            )
        if "error" in report:
            typer.echo(f"error: {report['error']}")
        totals = report.get("queue_status") or {}
        if totals:
            typer.echo(
                "queue: "
                + ", ".join(
                    f"{k.removesuffix('_records')} {totals[k]}"
                    for k in (
                        "pending_records",
                        "processing_records",
                        "completed_records",
                        "failed_records",
                    )
                )
            )
    if report["status"] == "unhealthy":
        raise typer.Exit(1)


@app.command()
def requeue(
    flow: Annotated[str, typer.Argument(help="Flow whose failed records go back.")],
    ids: Annotated[list[int] | None, typer.Option("--id", help="A failed record id.")] = None,
    all_failed: Annotated[bool, typer.Option("--all-failed", help="Every failed record.")] = False,
    dsn: DsnOption = None,
    db: DbOption = None,
) -> None:
    """Put failed records back in the queue with their retries reset."""
    from flowfleet import queue

    if not ids and not all_failed:
        fail("say which records: --id ID (repeatable) or --all-failed", 2)
    with user_errors():
        with database(dsn, db).connection() as conn:
            requeued = queue.requeue_failed(conn, flow, ids if not all_failed else None)
    typer.echo(f"requeued {len(requeued)} failed records of {flow}")


@app.command()
def worker(
    flow: Annotated[str, typer.Argument(help="Flow whose records this worker processes.")],
    entrypoint: Annotated[
        str | None, typer.Option(help="Record processor as module:function.")
    ] = None,
    runner: Annotated[str | None, typer.Option(help="prefect (default) or plain.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Records per claim (default 50).")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Claim loops in this process.")] = None,
    lease_seconds: Annotated[float | None, typer.Option(help="Claim lease, renewed.")] = None,
    grace_seconds: Annotated[float | None, typer.Option(help="Drain time on SIGTERM.")] = None,
    poll_seconds: Annotated[float | None, typer.Option(help="Poll when no NOTIFY comes.")] = None,
    http_port: Annotated[int | None, typer.Option(help="Health/metrics port; 0 = off.")] = None,
    max_retries: Annotated[int | None, typer.Option(help="Retries before failed.")] = None,
    record_timeout_seconds: Annotated[
        float | None, typer.Option(help="A record running longer is hung (0 = no limit).")
    ] = None,
    exit_when_empty: Annotated[
        bool, typer.Option(help="Exit 0 once the flow has no pending or running records.")
    ] = False,
    log_format: Annotated[str, typer.Option(help="auto, json or text.")] = "auto",
    dsn: DsnOption = None,
    db: DbOption = None,
) -> None:
    """Claim and process a flow's records until SIGTERM; every option also reads from
    the flow's settings (e.g. DEVELOPMENT_<FLOW>_DISTRIBUTED_BATCH_SIZE)."""
    from flowfleet import entrypoint as entrypoints
    from flowfleet import logs
    from flowfleet.identity import instance_id
    from flowfleet.settings import load_settings
    from flowfleet.worker import Worker

    with user_errors():
        settings = load_settings(
            flow,
            {
                "entrypoint": entrypoint,
                "runner": runner,
                "batch_size": batch_size,
                "concurrency": concurrency,
                "lease_seconds": lease_seconds,
                "grace_seconds": grace_seconds,
                "poll_seconds": poll_seconds,
                "http_port": http_port,
                "max_retries": max_retries,
                "record_timeout_seconds": record_timeout_seconds,
                "exit_when_empty": exit_when_empty,
            },
        )
        processor = entrypoints.load(settings.entrypoint)
        me = instance_id()
        logs.configure(flow, me, log_format)
        code = Worker(settings, database(dsn, db), processor, me).run()
    raise typer.Exit(code)


@app.command()
def operator() -> None:
    """Run the DistributedFlow operator (settings from FLOWFLEET_OPERATOR_* env)."""
    try:
        from flowfleet_operator.main import run
    except ImportError as exc:
        fail(f"the operator needs the operator extra: pip install 'flowfleet[operator]' ({exc})")
    run()


def main() -> None:
    # The pool retries in the background and logs each failed attempt; a command that
    # fails says so once, in its own words.
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
    app()


if __name__ == "__main__":
    main()

"""The ``flowfleet`` command."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

import typer

try:  # typer 0.29 carries its own copy of click; earlier ones use click itself
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import (  # type: ignore[assignment]
        ClickException,
        NoArgsIsHelpError,
        UsageError,
    )

from flowfleet.cli_common import FLOW_NAME as FLOW_NAME
from flowfleet.cli_common import (
    DbOption,
    DsnOption,
    app,
    bounded,
    database,
    fail,
    first_line,
    flow_name,
    print_json,
    user_errors,
)
from flowfleet.database import DatabaseManager
from flowfleet.errors import InvalidRecordError
from flowfleet.redaction import redact


def wait_for(target: DatabaseManager, seconds: float) -> None:
    """Until ``target`` answers or ``seconds`` pass: a Kubernetes init container may start
    before its database does. Each wait is reported, in one line."""
    from flowfleet.errors import DatabaseUnavailableError

    deadline = time.monotonic() + seconds
    delay = 1.0
    while True:
        try:
            with target.connection(timeout=5.0):
                return
        except DatabaseUnavailableError as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DatabaseUnavailableError(f"{exc} (waited {seconds:g}s)") from None
            typer.echo(f"flowfleet: {redact(str(exc))}; retrying in {delay:.0f}s", err=True)
            time.sleep(min(delay, left))
            delay = min(delay * 2, 10.0)


@app.command()
def migrate(
    wait: Annotated[
        bool,
        typer.Option(
            "--wait", help="Wait for the database to answer first (e.g. in an init container)."
        ),
    ] = False,
    wait_seconds: Annotated[
        float,
        typer.Option(help="Give up waiting after this long.", callback=bounded(0, 86400)),
    ] = 300.0,
    dsn: DsnOption = None,
    db: DbOption = None,
) -> None:
    """Create or upgrade the queue schema (idempotent; safe to run concurrently)."""
    from flowfleet.migrate import current_version
    from flowfleet.migrate import migrate as run_migrations

    with user_errors():
        target = database(dsn, db)
        if wait:
            wait_for(target, wait_seconds)
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
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def json_lines(text: str) -> list[str]:
    """Split at ``\n`` (a ``\r`` before it goes too) and nowhere else: U+2028, U+2029,
    U+0085 and lone ``\r`` may stand raw inside a JSON string, where ``splitlines`` (and
    Python's universal newlines) would cut the line in two."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def read_records(source: str) -> list[Any]:
    """JSON lines or one JSON array, from a file or ``-``; errors name the line."""
    # Bytes, decoded here: text mode would translate newlines before we see them.
    data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    text = data.decode("utf-8")
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
    for number, line in enumerate(json_lines(text), start=1):
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
    flow: Annotated[
        str, typer.Argument(help="Flow name the records belong to.", callback=flow_name)
    ],
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
        try:
            count = processor.add_records_to_queue(
                flow, records, priority=priority, delay_seconds=delay, dedup_key=dedup_key
            )
        except RecursionError:
            # Deep enough to parse, too deep to serialise again: refused before any write.
            raise InvalidRecordError("a record is nested too deeply to enqueue") from None
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


def _instances_table(instances: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table("flow", "instance", "processing", "lease expired", "oldest claim (UTC)")
    for row in instances:
        table.add_row(
            row["flow_name"],
            row["instance_id"] or "-",
            str(row["processing_records"]),
            str(row["expired_records"]),
            f"{row['oldest_claim']:%Y-%m-%d %H:%M:%S}" if row["oldest_claim"] else "-",
        )
    return table


def _status_view(status: dict[str, Any], instances: list[dict[str, Any]], flow: str | None) -> Any:
    from rich.console import Group

    if not instances:
        return _status_table(status, flow)
    return Group(_status_table(status, flow), _instances_table(instances))


def _json_instances(instances: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {**row, "oldest_claim": row["oldest_claim"].isoformat() if row["oldest_claim"] else None}
        for row in instances
    ]


@app.command()
def status(
    flow: Annotated[str | None, typer.Argument(help="One flow; all flows when omitted.")] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print get_queue_status() as JSON; with --watch, one compact object per line "
            "per interval, with a timestamp.",
        ),
    ] = False,
    instances: Annotated[
        bool,
        typer.Option(
            "--instances",
            help="With --json: add by_instance, the records each instance (pod) holds.",
        ),
    ] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh until interrupted.")] = False,
    interval: Annotated[
        float,
        typer.Option(
            help="Seconds between refreshes with --watch.",
            callback=bounded(0, 86400, low_open=True),
        ),
    ] = 2.0,
    dsn: DsnOption = None,
    db: DbOption = None,
) -> None:
    """Queue depth per status, for one flow or all, and which instance (pod) holds what."""
    from rich.console import Console
    from rich.live import Live

    from flowfleet import queue
    from flowfleet.distributed import DistributedProcessor

    with user_errors():
        target = database(dsn, db)
        processor = DistributedProcessor(target)

        def by_instance() -> list[dict[str, Any]]:
            with target.connection() as conn:
                return queue.processing_by_instance(conn, flow)

        def snapshot() -> dict[str, Any]:
            current = processor.get_queue_status(flow)
            if instances:
                current["by_instance"] = _json_instances(by_instance())
            return current

        if as_json and not watch:
            print_json(snapshot())
            return
        if as_json:
            # A stream for jq and log shippers: one line per interval, flushed as written.
            try:
                while True:
                    line = {**snapshot(), "timestamp": datetime.now(timezone.utc).isoformat()}
                    typer.echo(json.dumps(line, sort_keys=True, default=str))
                    sys.stdout.flush()
                    time.sleep(interval)
            except KeyboardInterrupt:
                return
        console = Console()
        if not watch:
            console.print(_status_view(processor.get_queue_status(flow), by_instance(), flow))
            return
        try:
            with Live(console=console, auto_refresh=False) as live:
                while True:
                    view = _status_view(processor.get_queue_status(flow), by_instance(), flow)
                    live.update(view, refresh=True)
                    time.sleep(interval)
        except KeyboardInterrupt:
            pass


@app.command()
def failed(
    flow: Annotated[str, typer.Argument(help="Flow whose failed records to list.")],
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="Show at most this many.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array, full errors.")] = False,
    dsn: DsnOption = None,
    db: DbOption = None,
) -> None:
    """Failed records of a flow (id, retries, error), for `flowfleet requeue --id`."""
    from rich.console import Console
    from rich.table import Table

    from flowfleet import queue

    with user_errors():
        with database(dsn, db).connection() as conn:
            rows, total = queue.failed_records(conn, flow, limit)
    for row in rows:
        # A processor's exception text may quote a connection string.
        row["error_message"] = redact(row["error_message"] or "")
    if as_json:
        print_json(rows)
        return
    if not rows:
        typer.echo(f"no failed records of {flow}")
        return
    table = Table("id", "retries", "abandoned", "failed at (UTC)", "error")
    for row in rows:
        first = row["error_message"].strip().splitlines()
        table.add_row(
            str(row["id"]),
            str(row["retry_count"]),
            str(row["abandoned_count"]),
            f"{row['updated_at']:%Y-%m-%d %H:%M:%S}",
            first[0][:200] if first else "",
        )
    console = Console()
    console.print(table)
    shown = f", showing the first {len(rows)} (--limit)" if total > len(rows) else ""
    console.print(f"{total} failed records of {flow}{shown}", markup=False, highlight=False)


@app.command()
def cleanup(
    timeout_hours: Annotated[
        float | None,
        typer.Option(
            help="Also release claims older than this (hours).", callback=bounded(0, 24 * 3650)
        ),
    ] = None,
    completed_older_than_hours: Annotated[
        float | None,
        typer.Option(
            help="Delete completed records older than this (hours).",
            callback=bounded(0, 24 * 3650),
        ),
    ] = None,
    instance: Annotated[
        str | None,
        typer.Option(
            help="Also release every record this instance (pod, or hostname-pid) holds, "
            "whatever its lease: for a claimer you know is gone.",
        ),
    ] = None,
    dsn: DsnOption = None,
    db: DbOption = None,
) -> None:
    """Return orphaned records (expired leases) to the queue; optionally prune history."""
    from flowfleet import queue
    from flowfleet.distributed import DistributedProcessor

    with user_errors():
        target = database(dsn, db)
        processor = DistributedProcessor(target)
        released = processor.cleanup_orphaned_records(timeout_hours)
        typer.echo(f"released {released} orphaned records")
        if instance is not None:
            with target.connection() as conn:
                freed = queue.release_instance_everywhere(conn, instance)
            typer.echo(f"released {len(freed)} records held by {instance}")
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
                redact(
                    f"database {name}: {info['status']}"
                    + (f" ({info['error']})" if "error" in info else "")
                )
            )
        if "error" in report:
            typer.echo(redact(f"error: {report['error']}"))
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
    """Put failed records back in the queue with their retries reset.

    Exits 1 when an --id names no record of FLOW; one that is not failed is noted.
    """
    from flowfleet import queue

    if ids and all_failed:
        fail("give --id ID (repeatable) or --all-failed, not both", 2)
    if not ids and not all_failed:
        fail("say which records: --id ID (repeatable) or --all-failed", 2)
    with user_errors():
        with database(dsn, db).connection() as conn:
            requeued = queue.requeue_failed(conn, flow, ids if not all_failed else None)
            missing = sorted(set(ids or ()) - set(requeued))
            found = queue.records_by_id(conn, missing) if missing else {}
    typer.echo(f"requeued {len(requeued)} failed records of {flow}")
    # A record of this flow that is no longer failed (requeued already, say) is only
    # noted, so a rerun stays a success; an id that names nothing of FLOW is an error.
    unknown, idle = [], []
    for record_id in missing:
        if record_id not in found:
            unknown.append(f"{record_id} not found")
        elif found[record_id][0] != flow:
            unknown.append(f"{record_id} belongs to flow {found[record_id][0]!r}")
        else:
            idle.append(f"{record_id} is {found[record_id][1]}, not failed")
    if idle:
        typer.echo(redact(f"flowfleet: left alone: {'; '.join(idle)}"), err=True)
    if unknown:
        fail(f"not requeued: {'; '.join(unknown)}")


# Registers the worker and operator commands on ``app``, after the queue commands.
from flowfleet.cli_worker import operator as operator  # noqa: E402
from flowfleet.cli_worker import worker as worker  # noqa: E402


def main() -> None:
    # The pool retries in the background and logs each failed attempt; a command that
    # fails says so once, in its own words.
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
    try:
        code = app(standalone_mode=False)
    except NoArgsIsHelpError as exc:
        typer.echo(exc.format_message(), err=True)
        sys.exit(exc.exit_code)
    except ClickException as exc:
        # Usage errors as one line, redacted: a misplaced connection string is a "value".
        hint = ""
        if isinstance(exc, UsageError) and exc.ctx is not None:
            hint = f" (see {exc.ctx.command_path} --help)"
        typer.echo(f"flowfleet: {redact(exc.format_message())}{hint}", err=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:
        # A bug of ours: still one line, still no password; the traceback on request.
        if os.environ.get("FLOWFLEET_DEBUG"):
            typer.echo(redact(traceback.format_exc()), err=True)
        typer.echo(
            f"flowfleet: unexpected {type(exc).__name__}: {redact(first_line(exc))} "
            "(FLOWFLEET_DEBUG=1 shows the traceback)",
            err=True,
        )
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

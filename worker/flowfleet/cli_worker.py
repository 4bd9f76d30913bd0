"""The long-running ``flowfleet`` commands: ``worker`` and ``operator``."""

from __future__ import annotations

import errno
from typing import Annotated

import typer

from flowfleet import defaults
from flowfleet.cli_common import (
    DbOption,
    DsnOption,
    app,
    database,
    fail,
    flow_name,
    user_errors,
)


@app.command()
def worker(
    flow: Annotated[
        str,
        typer.Argument(help="Flow whose records this worker processes.", callback=flow_name),
    ],
    entrypoint: Annotated[
        str | None,
        typer.Option(
            help="Record processor as module:function; the current directory is importable."
        ),
    ] = None,
    runner: Annotated[
        str | None, typer.Option(help=f"prefect or plain (default {defaults.RUNNER}).")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(help=f"Records per claim (default {defaults.BATCH_SIZE})."),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(help=f"Claim loops in this process (default {defaults.CONCURRENCY})."),
    ] = None,
    lease_seconds: Annotated[
        float | None,
        typer.Option(
            help=f"Claim lease, renewed every third of it (default {defaults.LEASE_SECONDS})."
        ),
    ] = None,
    grace_seconds: Annotated[
        float | None,
        typer.Option(help=f"Drain time on SIGTERM (default {defaults.GRACE_SECONDS})."),
    ] = None,
    poll_seconds: Annotated[
        float | None,
        typer.Option(help=f"Poll when no NOTIFY comes (default {defaults.POLL_SECONDS})."),
    ] = None,
    http_port: Annotated[
        int | None,
        typer.Option(help=f"Health/metrics port; 0 = off (default {defaults.HTTP_PORT})."),
    ] = None,
    max_retries: Annotated[
        int | None,
        typer.Option(help=f"Retries before failed (default {defaults.MAX_RETRIES})."),
    ] = None,
    record_timeout_seconds: Annotated[
        float | None,
        typer.Option(
            help="A record running longer is hung; 0 = no limit"
            f" (default {defaults.RECORD_TIMEOUT_SECONDS}).",
        ),
    ] = None,
    max_batch_bytes: Annotated[
        int | None,
        typer.Option(
            help="Bound a batch's payload bytes (one record always fits); default no bound."
        ),
    ] = None,
    exit_when_empty: Annotated[
        bool, typer.Option(help="Exit 0 once the flow has no pending or running records.")
    ] = False,
    log_format: Annotated[str, typer.Option(help="auto, json or text.")] = "auto",
    log_level: Annotated[
        str | None,
        typer.Option(
            help="debug, info, warning, error or critical; for flowfleet, the processor"
            " and Prefect alike (default info)."
        ),
    ] = None,
    dsn: DsnOption = None,
    db: DbOption = None,
) -> None:
    """Claim and process a flow's records until SIGTERM.

    Every option also reads from the flow's settings, e.g.
    DEVELOPMENT_<FLOW>_DISTRIBUTED_BATCH_SIZE.
    """
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
                "max_batch_bytes": max_batch_bytes,
                "exit_when_empty": exit_when_empty,
                "log_level": log_level,
            },
        )
        processor = entrypoints.load(settings.entrypoint)
        me = instance_id()
        logs.configure(flow, me, log_format, settings.log_level)
        try:
            code = Worker(settings, database(dsn, db), processor, me).run()
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            fail(
                f"HTTP port {settings.http_port} is already in use (another worker on this "
                "machine?): give each worker its own --http-port, or --http-port 0 for none"
            )
    raise typer.Exit(code)


@app.command()
def operator() -> None:
    """Run the DistributedFlow operator (settings from FLOWFLEET_OPERATOR_* env)."""
    try:
        from flowfleet_operator.main import run
    except ImportError as exc:
        fail(f"the operator needs the operator extra: pip install 'flowfleet[operator]' ({exc})")
    run()

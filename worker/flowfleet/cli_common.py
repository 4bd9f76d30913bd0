"""What every ``flowfleet`` command shares: the app, option types, one-line errors."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, TypeVar

import psycopg
import typer

from flowfleet.database import DatabaseManager
from flowfleet.errors import FlowfleetError
from flowfleet.redaction import redact

app = typer.Typer(
    name="flowfleet",
    help="A fenced PostgreSQL queue for Prefect record-processing flows.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])

# The same rule as the DistributedFlow CRD's spec.flowName (crds/distributedflow.yaml;
# tests/integration/test_cli_names.py holds the two together): a flow enqueued or worked on from
# here can always be given to the operator.
FLOW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def flow_name(value: str) -> str:
    if not FLOW_NAME.fullmatch(value):
        raise typer.BadParameter(
            f"{value!r} is not a flow name: 1-100 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return value


def bounded(low: float, high: float, *, low_open: bool = False) -> Callable[[Any], Any]:
    """An option callback refusing NaN, infinities and values outside low..high, so that
    an absurd number is one line naming the option, not a traceback later."""

    def check(value: float | None) -> float | None:
        if value is None:
            return value
        if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
            lower = f"above {low:g}" if low_open else f"at least {low:g}"
            raise typer.BadParameter(
                f"{value!r}: must be a finite number {lower}, at most {high:g}"
            )
        return value

    return check


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
    # Every message leaves through here or main(): redacted, whatever path it came by.
    typer.echo(f"flowfleet: {redact(message)}", err=True)
    raise typer.Exit(code)


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


@contextmanager
def user_errors() -> Iterator[None]:
    """Our errors end the command with their one line and no traceback."""
    try:
        yield
    except FlowfleetError as exc:
        fail(str(exc))
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
        # The hint the worker gives at start-up, instead of a bare "relation does not exist".
        fail(
            "the queue database has no flowfleet schema, or an older one "
            f"({first_line(exc)}): run `flowfleet migrate`"
        )
    except psycopg.Error as exc:
        # Anything else the database refuses: its first line, which names no secret.
        fail(f"database error: {first_line(exc)}")
    except RecursionError:
        fail("input nested too deeply to handle")


def print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


def _show_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"flowfleet {version('flowfleet')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            from flowfleet import __version__

            typer.echo(f"flowfleet {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_show_version, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """A fenced PostgreSQL queue for Prefect record-processing flows."""

"""One builder for the `flowfleet worker` command line, in step with the CLI."""

from __future__ import annotations

import inspect
import sys

import pytest

from flowfleet import cli
from flowfleet.workercmd import OPTIONS, worker_command


def test_options_are_the_cli_options() -> None:
    parameters = set(inspect.signature(cli.worker).parameters) - {"flow", "entrypoint"}
    assert parameters == OPTIONS


def test_command_in_the_order_given() -> None:
    assert worker_command(
        "survey", "pkg.mod:fn", runner="plain", batch_size=50, lease_seconds=2.5, http_port=0
    ) == [
        sys.executable,
        "-m",
        "flowfleet.cli",
        "worker",
        "survey",
        "--entrypoint",
        "pkg.mod:fn",
        "--runner",
        "plain",
        "--batch-size",
        "50",
        "--lease-seconds",
        "2.5",
        "--http-port",
        "0",
    ]


def test_flags_and_left_out_options() -> None:
    argv = worker_command(
        "f", "m:f", python="py", exit_when_empty=True, lease_seconds=None, log_format="json"
    )
    assert argv == ["py", "-m", "flowfleet.cli", "worker", "f", "--entrypoint", "m:f",
                    "--exit-when-empty", "--log-format", "json"]  # fmt: skip
    assert "--exit-when-empty" not in worker_command("f", "m:f", exit_when_empty=False)


def test_an_unknown_option_names_itself() -> None:
    with pytest.raises(TypeError, match="no option batchsize"):
        worker_command("f", "m:f", batchsize=5)

"""The ``flowfleet worker`` command line, built in one place for everything that starts
workers as processes (the demo, the benchmarks, the tests).

    worker_command("survey", "pkg.mod:fn", runner="plain", http_port=0, exit_when_empty=True)
    -> [python, "-m", "flowfleet.cli", "worker", "survey", "--entrypoint", "pkg.mod:fn",
        "--runner", "plain", "--http-port", "0", "--exit-when-empty"]
"""

from __future__ import annotations

import sys

# The options of `flowfleet worker` (tests/unit/test_workercmd.py keeps this in step with
# the CLI): a misspelt one fails here, naming itself, not in a worker's stderr.
OPTIONS = frozenset(
    {
        "runner",
        "batch_size",
        "concurrency",
        "lease_seconds",
        "grace_seconds",
        "poll_seconds",
        "http_port",
        "max_retries",
        "record_timeout_seconds",
        "max_batch_bytes",
        "exit_when_empty",
        "log_format",
        "log_level",
        "dsn",
        "db",
    }
)

Option = str | int | float | bool | None


def worker_command(
    flow: str, entrypoint: str, *, python: str | None = None, **options: Option
) -> list[str]:
    """The argv of ``flowfleet worker flow --entrypoint entrypoint …``, options in the order
    given: ``batch_size=50`` becomes ``--batch-size 50``; True gives a bare flag
    (``--exit-when-empty``); False and None leave the option out."""
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise TypeError(f"flowfleet worker has no option {', '.join(unknown)}")
    argv = [python or sys.executable, "-m", "flowfleet.cli", "worker", flow]
    argv += ["--entrypoint", entrypoint]
    for name, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv

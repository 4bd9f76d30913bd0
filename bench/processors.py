"""Processors the worker benchmarks load with --entrypoint (PYTHONPATH=bench)."""

from __future__ import annotations

import os
import time
from typing import Any


def noop(payload: dict[str, Any]) -> None:
    return None


def stamp(payload: dict[str, Any]) -> None:
    """Append 'sent started' for the latency benchmark; one write, appended atomically."""
    started = time.time()
    line = f"{payload['sent']} {started}\n".encode()
    fd = os.open(os.environ["FLOWFLEET_BENCH_STAMPS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)

"""Processors for the fault tests (``tests/integration/test_faults_*.py``).

``poison`` misbehaves as ``payload["poison"]`` says and succeeds otherwise;
``freeze_before_commit`` stops its own process between its record's completion and the
commit of that completion, like a pod frozen by SIGSTOP, a paused VM or a stuck network;
``exit_on`` calls ``sys.exit`` for marked records.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

import psycopg

from flowfleet import queue


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("this exception cannot be printed")


def poison(payload: dict[str, Any]) -> Any:
    kind = payload.get("poison")
    if kind == "nul":
        raise ValueError("a NUL \0 in the message")
    if kind == "unprintable":
        raise UnprintableError()
    if kind == "surrogate_error":
        raise ValueError("a lone surrogate \udc80 in the message")
    if kind == "surrogate_result":
        return {"text": "a lone surrogate \ud800 in the result"}
    if kind == "surrogate_key":
        return {"\udfff": 1}
    return {"k": payload["k"]} if payload.get("result") else None


def poison_in_transaction(payload: dict[str, Any], conn: psycopg.Connection) -> Any:
    """``poison`` for the path where the processor's writes commit with its record."""
    return poison(payload)


def freeze_before_commit(payload: dict[str, Any], conn: psycopg.Connection) -> None:
    """For a record marked ``freeze``, in a worker whose environment sets
    FLOWFLEET_TEST_FREEZE: once the worker's completion statement returns (the record's
    queue row deleted and locked, the transaction still open), stop this whole process
    with SIGSTOP. Other records take ``payload["sleep"]`` seconds."""
    if not (payload.get("freeze") and os.environ.get("FLOWFLEET_TEST_FREEZE")):
        time.sleep(float(payload.get("sleep", 0)))
        return
    complete_code = queue.complete.__code__

    def stop_after_complete(frame: FrameType, event: str, _arg: Any) -> None:
        if event == "return" and frame.f_code is complete_code:
            sys.setprofile(None)
            # At this thread: a SIGSTOP sent to the process lets the sender run on until
            # its next system call, which would be the COMMIT.
            signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)

    sys.setprofile(stop_after_complete)


def exit_on(payload: dict[str, Any]) -> None:
    """``sys.exit(3)`` for records marked ``exit``; the others take FLOWFLEET_TEST_SLEEP."""
    if payload.get("exit"):
        sys.exit(3)
    seconds = float(os.environ.get("FLOWFLEET_TEST_SLEEP", "0"))
    if seconds:
        time.sleep(seconds)


def append_log_after(payload: dict[str, Any]) -> None:
    """Takes ``payload["sleep"]`` seconds (default FLOWFLEET_TEST_SLEEP), then appends the
    record's key to the effect log, like ``effects.append_log``."""
    from processors.effects import append_log

    time.sleep(float(payload.get("sleep", 0)))
    append_log(payload)

"""Processors with observable effects, for the crash, drain and latency tests."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import psycopg

_local = threading.local()
_log_fd: int | None = None
_log_lock = threading.Lock()


def _sleep() -> None:
    seconds = float(os.environ.get("FLOWFLEET_TEST_SLEEP", "0"))
    if seconds:
        time.sleep(seconds)


def _own_connection() -> psycopg.Connection:
    """A connection of this processor's own, outside the worker's transactions: what it
    writes commits whether or not the record is ever marked completed."""
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = psycopg.connect(os.environ["FLOWFLEET_TEST_DSN"], autocommit=True)
        _local.conn = conn
    return conn


def append_log(payload: dict[str, Any]) -> None:
    """Works, then appends the record's key to a file: an at-least-once effect log. One
    ``write`` to an O_APPEND descriptor, so a SIGKILL leaves whole lines only."""
    global _log_fd
    _sleep()
    with _log_lock:
        if _log_fd is None:
            _log_fd = os.open(
                os.environ["FLOWFLEET_TEST_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644
            )
    os.write(_log_fd, f"{payload['k']}\n".encode())


def effect_in_transaction(payload: dict[str, Any], conn: psycopg.Connection) -> None:
    """Writes its effect in the transaction that completes the record, then works a
    little, so that kills land while the transaction is open."""
    conn.execute("INSERT INTO effects (k) VALUES (%s)", (str(payload["k"]),))
    _sleep()


def sleepy(payload: dict[str, Any]) -> None:
    """Takes ``payload["sleep"]`` seconds (else FLOWFLEET_TEST_SLEEP); returns nothing,
    so the worker commits completions together with its next claim."""
    if "sleep" in payload:
        time.sleep(float(payload["sleep"]))
    else:
        _sleep()


def sleepy_result(payload: dict[str, Any]) -> dict[str, Any]:
    """Like ``sleepy``, with a result to keep (the worker's other completion path)."""
    sleepy(payload)
    return {"k": payload.get("k")}


def poison(payload: dict[str, Any]) -> None:
    """Raises for payloads marked poison; the others succeed."""
    _sleep()
    if payload.get("poison"):
        raise ValueError(f"poison record {payload.get('k')}")


def stamp_start(payload: dict[str, Any]) -> None:
    """Records, over its own connection, the wall-clock moment the record started."""
    started = time.time()
    _own_connection().execute(
        "INSERT INTO starts (k, started) VALUES (%s, %s)", (str(payload["k"]), started)
    )

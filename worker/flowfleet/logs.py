"""Structured logs: every line carries the flow name and instance id, and what a line is
about (a record's id, a retry's attempt and delay, a batch's counts) as fields of its own.

    log.info("batch done", extra={"completed": 48, "failed": 2})
    -> {"ts": ..., "level": "info", "logger": ..., "flow": ..., "instance": ...,
        "msg": "batch done", "completed": 48, "failed": 2}

Everything logged in the process goes through one handler on the root logger: flowfleet's
own lines, the processor's, Prefect's and those of the temporary Prefect server.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any

from flowfleet.redaction import redact

LEVELS = ("debug", "info", "warning", "error", "critical")

# Attributes every LogRecord has; anything else on a record came in through `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "flow",
    "instance",
    "send_to_api",  # Prefect's note to its own API handler
}

# Libraries that log a line per HTTP request at INFO (Prefect's client talks to its API
# many times per flow run): shown only when the log level asks for debug.
_CHATTY = ("httpx", "httpcore", "urllib3", "asyncio", "aiosqlite")


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a line was given with ``extra=``."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact(str(value))


class _Context(logging.Filter):
    def __init__(self, flow_name: str, instance_id: str) -> None:
        super().__init__()
        self.flow_name = flow_name
        self.instance_id = instance_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.flow = self.flow_name
        record.instance = self.instance_id
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "flow": getattr(record, "flow", None),
            "instance": getattr(record, "instance", None),
            # A message may quote a driver error; connection strings never leave unredacted.
            "msg": redact(record.getMessage()),
        }
        for key, value in fields(record).items():
            entry.setdefault(key, _plain(value))
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s [%(flow)s %(instance)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = " ".join(f"{k}={_plain(v)}" for k, v in fields(record).items())
        if extra:
            head, newline, rest = line.partition("\n")
            line = f"{head} {extra}{newline}{rest}"
        return redact(line)


def level_number(name: str) -> int:
    """``info`` -> logging.INFO; anything outside LEVELS raises ValueError."""
    if name.lower() not in LEVELS:
        raise ValueError(f"log level {name!r} is not one of {', '.join(LEVELS)}")
    return int(getattr(logging, name.upper()))


def configure(flow_name: str, instance_id: str, fmt: str = "auto", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    handler.addFilter(_Context(flow_name, instance_id))
    # On the root logger, so what the processor, libraries (psycopg, Prefect) and Python's
    # warnings have to say arrives in the same format with the same context, at the level
    # asked for.
    threshold = level_number(level)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(threshold)
    logging.getLogger("flowfleet").setLevel(threshold)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(max(threshold, logging.WARNING))
    logging.captureWarnings(True)


def adopt_prefect_loggers() -> None:
    """Prefect's logging configuration (applied when it is imported) gives a few of its
    loggers console handlers of their own; send them through ours instead."""
    for name in ("prefect._internal", "uvicorn", "fastapi"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True

"""Structured logs: every line carries the flow name and instance id."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

from flowfleet.redaction import redact


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
        entry = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "flow": getattr(record, "flow", None),
            "instance": getattr(record, "instance", None),
            # A message may quote a driver error; connection strings never leave unredacted.
            "msg": redact(record.getMessage()),
        }
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s [%(flow)s %(instance)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def configure(flow_name: str, instance_id: str, fmt: str = "auto") -> None:
    handler = logging.StreamHandler(sys.stderr)
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    handler.addFilter(_Context(flow_name, instance_id))
    # On the root logger, so what libraries (psycopg, its pool, urllib3) and Python's
    # warnings have to say arrives in the same format with the same context.
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("flowfleet").setLevel(logging.INFO)
    logging.captureWarnings(True)

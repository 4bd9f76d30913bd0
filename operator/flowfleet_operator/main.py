"""``flowfleet operator``: settings from env, JSON logs, then kopf until SIGTERM."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

import kopf

from flowfleet.redaction import redact
from flowfleet_operator.settings import OperatorSettings, SettingsError, load_settings


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        ref = getattr(record, "k8s_ref", None)  # kopf's per-object loggers
        if isinstance(ref, dict):
            entry["object"] = f"{ref.get('namespace')}/{ref.get('name')}"
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def configure_logging(settings: OperatorSettings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # Per-request chatter of the API client and aiohttp is noise at INFO.
    for noisy in ("urllib3", "kubernetes", "aiohttp.access", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if settings.log_level != "DEBUG":
        # kopf says "Handler ... succeeded" for every watched event; failures stay.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    logging.captureWarnings(True)


def run() -> None:
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"flowfleet operator: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings)
    from flowfleet_operator import handlers  # noqa: F401  (registers the handlers)

    kopf.run(
        standalone=True,
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
        memo=kopf.Memo(operator_settings=settings),
    )

"""A processor that logs, as users' processors do, through the standard logging module."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("chatty")


def process(payload: dict[str, Any]) -> None:
    log.debug("payload %s", payload)
    if payload.get("poison"):
        log.warning("poison ahead")
        raise ValueError(f"poison record {payload.get('k')}")
    log.info("record %s", payload.get("k"))

"""The log formats: fields given with `extra=` as fields, redacted; the level names."""

from __future__ import annotations

import json
import logging

import pytest

from flowfleet.logs import JsonFormatter, TextFormatter, level_number


def record(msg: str, **extra: object) -> logging.LogRecord:
    entry = logging.LogRecord("flowfleet.batch", logging.INFO, __file__, 1, msg, None, None)
    entry.flow = "survey"
    entry.instance = "pod-1"
    for key, value in extra.items():
        setattr(entry, key, value)
    return entry


def test_json_carries_extra_fields_beside_msg() -> None:
    line = JsonFormatter().format(
        record("batch of 3", completed=2, failed=1, delay=0.5, note=None, ok=True)
    )
    entry = json.loads(line)
    assert entry["msg"] == "batch of 3"
    assert (entry["flow"], entry["instance"], entry["level"]) == ("survey", "pod-1", "info")
    assert {k: entry[k] for k in ("completed", "failed", "delay", "note", "ok")} == {
        "completed": 2,
        "failed": 1,
        "delay": 0.5,
        "note": None,
        "ok": True,
    }


def test_fields_do_not_override_the_standard_keys_and_are_redacted() -> None:
    entry = json.loads(
        JsonFormatter().format(
            record("hi", level="spoof", where="postgresql://u:hunter2@db/q", send_to_api=False)
        )
    )
    assert entry["level"] == "info"
    assert "hunter2" not in entry["where"]
    assert "send_to_api" not in entry


def test_text_puts_fields_after_the_message() -> None:
    line = TextFormatter().format(record("record 7 retried", record_id=7, attempt=2))
    assert line.endswith("[survey pod-1] record 7 retried record_id=7 attempt=2")


@pytest.mark.parametrize(
    ("name", "number"), [("debug", logging.DEBUG), ("INFO", logging.INFO), ("error", 40)]
)
def test_level_names(name: str, number: int) -> None:
    assert level_number(name) == number


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="'loud' is not one of debug, info"):
        level_number("loud")

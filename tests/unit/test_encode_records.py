"""queue.encode_records and check_flow_name: bad input is refused before any I/O."""

from __future__ import annotations

import json
import math
from collections import OrderedDict

import pytest

from flowfleet import queue
from flowfleet.errors import InvalidRecordError


def test_objects_encode_compactly_in_order() -> None:
    rows = queue.encode_records([{"a": 1}, {"b": [1, 2], "c": None}])
    assert rows == [('{"a":1}', None), ('{"b":[1,2],"c":null}', None)]


def test_any_mapping_is_accepted() -> None:
    rows = queue.encode_records([OrderedDict(x="y")])
    assert json.loads(rows[0][0]) == {"x": "y"}


def test_generator_input() -> None:
    rows = queue.encode_records({"i": i} for i in range(3))
    assert [json.loads(t) for t, _ in rows] == [{"i": 0}, {"i": 1}, {"i": 2}]


@pytest.mark.parametrize("bad", [[1, 2], "text", 42, 4.2, None, True, ("a",)])
@pytest.mark.parametrize("position", [0, 1, 2])
def test_non_object_names_its_index(bad: object, position: int) -> None:
    records: list[object] = [{"ok": 1}, {"ok": 2}]
    records.insert(position, bad)
    with pytest.raises(InvalidRecordError) as info:
        queue.encode_records(records)
    message = str(info.value)
    assert message.startswith(f"record {position}:")
    assert "JSON object" in message
    assert type(bad).__name__ in message


@pytest.mark.parametrize(
    "bad",
    [
        {"x": math.nan},
        {"x": math.inf},
        {"x": {1, 2}},
        {"x": object()},
        {"x": b"bytes"},
    ],
)
def test_unserialisable_payload_names_its_index(bad: dict) -> None:
    with pytest.raises(InvalidRecordError, match=r"^record 1: not JSON-serialisable"):
        queue.encode_records([{"ok": 1}, bad])


def test_nul_is_refused_because_postgres_json_cannot_hold_it() -> None:
    with pytest.raises(InvalidRecordError, match=r"^record 0: .*NUL"):
        queue.encode_records([{"x": "a\x00b"}])
    with pytest.raises(InvalidRecordError, match=r"^record 0: .*NUL"):
        queue.encode_records([{"a\x00": 1}])


def test_escaped_backslash_u0000_text_is_not_a_nul() -> None:
    # The literal six characters \u0000 in a string are fine; only a real NUL is not.
    rows = queue.encode_records([{"x": "\\u0000"}])
    assert json.loads(rows[0][0]) == {"x": "\\u0000"}


def test_dedup_key_by_field_and_by_function() -> None:
    records = [{"k": 1, "a": "x"}, {"k": "two", "a": "y"}, {"a": "z"}, {"k": None}]
    assert [key for _, key in queue.encode_records(records, "k")] == ["1", "two", None, None]
    by_fn = queue.encode_records(records, lambda r: r["a"] if "a" in r else None)
    assert [key for _, key in by_fn] == ["x", "y", "z", None]


@pytest.mark.parametrize(
    "name",
    ["", "   ", "x" * 101, "tab\there", "new\nline", "cr\rhere", "nul\0here", None, 7],
)
def test_bad_flow_names(name: object) -> None:
    with pytest.raises(InvalidRecordError):
        queue.check_flow_name(name)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name", ["x" * 100, "x'; DROP TABLE processing_queue; --", '"quoted"', "ñandú 🚀", "a\\b"]
)
def test_odd_but_valid_flow_names(name: str) -> None:
    assert queue.check_flow_name(name) == name


def test_retry_policy_defaults() -> None:
    policy = queue.RetryPolicy()
    assert (policy.max_retries, policy.backoff_base, policy.backoff_cap) == (3, 1.0, 300.0)

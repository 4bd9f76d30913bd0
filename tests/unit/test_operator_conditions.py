"""Conditions: transition times move only when a status flips; Ready sums them up."""

from __future__ import annotations

from flowfleet_operator import conditions as cond


def test_transition_time_kept_while_status_holds() -> None:
    c = cond.set_condition(
        [], "DatabaseReachable", True, "Connected", "a", 1, "2026-01-01T00:00:00Z"
    )
    c = cond.set_condition(
        c, "DatabaseReachable", True, "Connected", "b", 2, "2026-01-01T00:05:00Z"
    )
    (only,) = c
    assert only["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert (only["message"], only["observedGeneration"]) == ("b", 2)


def test_transition_time_moves_on_flip() -> None:
    c = cond.set_condition(
        [], "DatabaseReachable", True, "Connected", "", 1, "2026-01-01T00:00:00Z"
    )
    c = cond.set_condition(
        c, "DatabaseReachable", False, "AuthenticationFailed", "x", 1, "2026-01-01T00:01:00Z"
    )
    (only,) = c
    assert (only["status"], only["lastTransitionTime"]) == ("False", "2026-01-01T00:01:00Z")


def test_ready_follows_the_first_false_prerequisite() -> None:
    now = "2026-01-01T00:00:00Z"
    c = cond.set_condition(
        [], "DatabaseReachable", False, "SecretNotFound", "Secret ns/x not found", 1, now
    )
    c = cond.summarize_ready(c, 1, now, None)
    ready = cond.get_condition(c, "Ready")
    assert ready is not None
    assert (ready["status"], ready["reason"], ready["message"]) == (
        "False",
        "SecretNotFound",
        "Secret ns/x not found",
    )
    c = cond.set_condition(c, "DatabaseReachable", True, "Connected", "", 1, now)
    c = cond.set_condition(c, "SchemaReady", True, "Current", "", 1, now)
    c = cond.summarize_ready(c, 1, now, None)
    assert cond.is_true(c, "Ready")
    assert [x["type"] for x in c] == ["Ready", "DatabaseReachable", "SchemaReady"]


def test_blocked_forces_ready_false() -> None:
    now = "2026-01-01T00:00:00Z"
    c = cond.set_condition([], "DatabaseReachable", True, "Connected", "", 1, now)
    c = cond.set_condition(c, "SchemaReady", True, "Current", "", 1, now)
    c = cond.summarize_ready(c, 1, now, ("PrefectApiUrlMissing", "no API"))
    ready = cond.get_condition(c, "Ready")
    assert ready is not None and (ready["status"], ready["reason"]) == (
        "False",
        "PrefectApiUrlMissing",
    )

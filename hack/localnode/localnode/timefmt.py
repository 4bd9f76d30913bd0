"""Timestamps as the API server writes them."""

from __future__ import annotations

from datetime import datetime, timezone


def now() -> datetime:
    return datetime.now(timezone.utc)


def rfc3339(when: datetime | None = None) -> str:
    """metav1.Time: whole seconds."""
    return (when or now()).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro(when: datetime | None = None) -> str:
    """metav1.MicroTime (Lease renewTime, Event eventTime)."""
    return (when or now()).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

"""The seed's ``core.tasks``: operational checks callable from flows."""

from __future__ import annotations

from typing import Any

from flowfleet.database import DatabaseManager


def connection_pool_monitoring(db_name: str = "rpa_db") -> dict[str, Any]:
    """Pool size and use of the named database's pool in this process."""
    stats = DatabaseManager(db_name).pool_stats()
    limit = stats.get("max_size") or 0
    used = stats.get("checked_out", 0)
    return {
        "database": db_name,
        **stats,
        "utilization_percent": round(100.0 * used / limit, 2) if limit else 0.0,
    }

"""The seed's ``core.monitoring``: throughput and success over a time window."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from flowfleet import queue
from flowfleet.database import DatabaseManager


def _metrics(
    completed: int, failed: int, in_progress: int, hours: float, avg_seconds: float | None
) -> dict[str, Any]:
    finished = completed + failed
    return {
        "completed_records": completed,
        "failed_records": failed,
        "in_progress_records": in_progress,
        "success_rate_percent": round(100.0 * completed / finished, 2) if finished else 100.0,
        "avg_processing_rate_per_hour": round(completed / hours, 2) if hours else 0.0,
        "avg_processing_seconds": round(avg_seconds, 3) if avg_seconds is not None else None,
    }


def processing_performance_monitoring(
    time_window_hours: float = 24, db: DatabaseManager | str = "rpa_db"
) -> dict[str, Any]:
    """Success rate and processing rate over the last ``time_window_hours``, overall and per
    flow. Records count by their last update inside the window."""
    database = DatabaseManager(db) if isinstance(db, str) else db
    with database.connection() as conn:
        rows = queue.performance(conn, time_window_hours * 3600)
    per_flow: dict[str, Any] = {}
    for row in rows:
        per_flow[row["flow_name"]] = _metrics(
            int(row["completed"]),
            int(row["failed"]),
            int(row["in_progress"]),
            time_window_hours,
            row["avg_processing_seconds"],
        )
    completed = sum(m["completed_records"] for m in per_flow.values())
    weighted = sum(
        m["avg_processing_seconds"] * m["completed_records"]
        for m in per_flow.values()
        if m["avg_processing_seconds"] is not None
    )
    overall = _metrics(
        completed,
        sum(m["failed_records"] for m in per_flow.values()),
        sum(m["in_progress_records"] for m in per_flow.values()),
        time_window_hours,
        weighted / completed if completed else None,
    )
    return {
        "time_window_hours": time_window_hours,
        "generated_at": datetime.now(timezone.utc).isoformat(),
        "overall_metrics": overall,
        "flow_metrics": per_flow,
    }

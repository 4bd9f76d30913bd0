"""The seed's ``core.distributed``: the queue seen from producers and flows."""

from __future__ import annotations

import atexit
import threading
import weakref
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

from flowfleet import defaults, queue
from flowfleet.config import ConfigManager
from flowfleet.database import DatabaseManager
from flowfleet.errors import DatabaseUnavailableError
from flowfleet.identity import instance_id as default_instance_id
from flowfleet.migrate import current_version
from flowfleet.sql import latest_version


class DistributedProcessor:
    """Claims, completes and fails records of ``processing_queue`` in ``queue_db``.

    Settings come from ``ConfigManager("distributed_processor")``, e.g.
    ``DEVELOPMENT_DISTRIBUTED_PROCESSOR_MAX_RETRIES``.
    """

    def __init__(
        self,
        queue_db: DatabaseManager | str = "rpa_db",
        source_db: DatabaseManager | str | None = None,
        *,
        instance_id: str | None = None,
        max_retries: int | None = None,
        lease_seconds: float | None = None,
    ) -> None:
        self.queue_db = DatabaseManager(queue_db) if isinstance(queue_db, str) else queue_db
        self.source_db = DatabaseManager(source_db) if isinstance(source_db, str) else source_db
        self.instance_id = instance_id or default_instance_id()
        # Read now, not at import: PREFECT_ENVIRONMENT may be set after flowfleet loads.
        settings = ConfigManager("distributed_processor")
        self.cleanup_timeout_hours = float(
            settings.get_variable("cleanup_timeout_hours", float(defaults.CLEANUP_TIMEOUT_HOURS))
        )
        self.policy = queue.RetryPolicy(
            max_retries=max_retries
            if max_retries is not None
            else settings.get_variable("max_retries", defaults.MAX_RETRIES),
            backoff_base=settings.get_variable(
                "retry_backoff_seconds", defaults.RETRY_BACKOFF_SECONDS
            ),
            backoff_cap=settings.get_variable(
                "retry_backoff_max_seconds", defaults.RETRY_BACKOFF_MAX_SECONDS
            ),
        )
        # Callers of this API do not renew leases, so by default a claim lasts as long as
        # the seed's orphan timeout; the worker, which does renew, uses a short one.
        self.lease_seconds = lease_seconds or settings.get_variable(
            "lease_seconds", self.cleanup_timeout_hours * 3600
        )
        self.max_abandons = int(settings.get_variable("max_abandons", defaults.MAX_ABANDONS))
        self._tokens: dict[int, int] = {}
        self._lock = threading.Lock()

    # -- producers --------------------------------------------------------------------

    def add_records_to_queue(
        self,
        flow_name: str,
        records: Iterable[Any],
        *,
        priority: int = 0,
        delay_seconds: float = 0.0,
        dedup_key: queue.DedupKey = None,
    ) -> int:
        """Enqueue JSON-object records in one COPY; returns how many were added.

        ``dedup_key`` (a payload field name or a function of the record) skips records
        whose key is already live in the queue for this flow.
        """
        with self.queue_db.connection() as conn:
            return queue.enqueue(
                conn,
                flow_name,
                records,
                priority=priority,
                delay_seconds=delay_seconds,
                dedup_key=dedup_key,
            )

    # -- flows ------------------------------------------------------------------------

    def claim_records_batch(
        self, flow_name: str, batch_size: int = defaults.BATCH_SIZE
    ) -> list[dict[str, Any]]:
        """Claim up to ``batch_size`` pending records for this process's instance id."""
        queue.check_flow_name(flow_name)
        with self.queue_db.connection() as conn:
            claimed = queue.claim(conn, flow_name, self.instance_id, batch_size, self.lease_seconds)
        with self._lock:
            self._tokens.update((r.id, r.claim_token) for r in claimed)
        if claimed:
            _CLAIMERS.add(self)
        return [r.as_dict(flow_name) for r in claimed]

    def release_claimed(self) -> int:
        """Hand back every record this object claimed and has not completed or failed
        (no retry spent); returns how many were still ours. Runs by itself when the
        process exits normally."""
        with self._lock:
            held = list(self._tokens.items())
            self._tokens.clear()
        if not held:
            return 0
        # A connection of its own, not the pool's: at exit the pool may be closed, and a
        # pool waits out its timeout for a server that is gone where a connect fails fast.
        with self.queue_db.connect() as conn:
            return len(queue.release_tokens(conn, held))

    def _token(self, record_id: int, claim_token: int | None) -> int | None:
        with self._lock:
            known = self._tokens.pop(record_id, None)
        return claim_token if claim_token is not None else known

    def mark_record_completed(
        self, record_id: int, result: Any = None, *, claim_token: int | None = None
    ) -> bool:
        """Complete a claimed record. False when the claim was taken back meanwhile (the
        record belongs to someone else now, and is left alone)."""
        token = self._token(record_id, claim_token)
        with self.queue_db.connection() as conn:
            if token is None:
                return queue.complete_by_instance(conn, record_id, self.instance_id, result)
            return bool(queue.complete(conn, [(record_id, token)], [result]))

    def mark_record_failed(
        self,
        record_id: int,
        error_message: str,
        *,
        claim_token: int | None = None,
        error_details: str | None = None,
    ) -> str | None:
        """Record a failure: the record is retried after a backoff while retries remain,
        then marked ``failed`` keeping the error. Returns ``pending``, ``failed``, or None
        when the claim was no longer ours."""
        token = self._token(record_id, claim_token)
        with self.queue_db.connection() as conn:
            return queue.fail(
                conn,
                record_id,
                token,
                str(error_message),
                instance_id=self.instance_id,
                error_details=error_details,
                policy=self.policy,
            )

    # -- operations -------------------------------------------------------------------

    def get_queue_status(self, flow_name: str | None = None) -> dict[str, Any]:
        """Counts for one flow, or totals plus ``by_flow`` for every flow."""
        with self.queue_db.connection() as conn:
            flows = queue.stats(conn, flow_name)
        return queue_status(flows, flow_name)

    def cleanup_orphaned_records(self, timeout_hours: float | None = None) -> int:
        """Put back records whose claimer stopped renewing its lease and, given
        ``timeout_hours``, records claimed longer ago than that; returns how many came
        back. No retry is spent. Claims made through this API last
        ``cleanup_timeout_hours`` (the seed's ``CLEANUP_TIMEOUT_HOURS``) unless renewed."""
        seconds = None if timeout_hours is None else timeout_hours * 3600
        with self.queue_db.connection() as conn:
            return len(queue.release_orphans(conn, seconds, max_abandons=self.max_abandons))

    def cleanup_completed_records(self, older_than_hours: float = 24 * 7) -> int:
        """Delete completed records older than ``older_than_hours``; returns how many."""
        with self.queue_db.connection() as conn:
            return queue.cleanup_completed(conn, older_than_hours * 3600)

    def health_check(self) -> dict[str, Any]:
        """``status`` is ``unhealthy`` when the queue database is unreachable or not
        migrated, ``degraded`` when a source database is down or the schema is behind."""
        databases = {self.queue_db.name: self.queue_db.health_check()}
        if self.source_db is not None:
            databases[self.source_db.name] = self.source_db.health_check()
        report: dict[str, Any] = {
            "status": "healthy",
            "instance_id": self.instance_id,
            "databases": databases,
            "queue_status": {},
            "timestamp": datetime.now(timezone.utc).isoformat(),
        }
        if databases[self.queue_db.name]["status"] != "healthy":
            report["status"] = "unhealthy"
            return report
        try:
            with self.queue_db.connection() as conn:
                version = current_version(conn)
                report["schema_version"] = version
                if version == 0:
                    report["status"] = "unhealthy"
                    report["error"] = "queue schema missing: run `flowfleet migrate`"
                    return report
                report["queue_status"] = queue_status(queue.stats(conn))
        except DatabaseUnavailableError as exc:
            report.update(status="unhealthy", error=str(exc))
            return report
        if version < latest_version() or any(d["status"] != "healthy" for d in databases.values()):
            report["status"] = "degraded"
        return report


# Claims made through this API are not renewed and last cleanup_timeout_hours. A process
# that ends holding some (the troubleshooting snippet's claim_records_batch, a script that
# stopped early) gives them back on its way out instead of leaving them locked that long.
_CLAIMERS: weakref.WeakSet[DistributedProcessor] = weakref.WeakSet()


@atexit.register
def _release_at_exit() -> None:
    for processor in list(_CLAIMERS):
        try:
            processor.release_claimed()
        except Exception:  # noqa: S110 - exiting anyway; the lease still brings them back
            pass


def queue_status(flows: dict[str, dict[str, int]], flow_name: str | None = None) -> dict[str, Any]:
    """Shape per-flow counts as ``get_queue_status`` answers. Rows whose status is none of
    the four (a table adopted from the seed may hold them) count towards
    ``total_records`` and, where there are any, appear as ``other_records``."""
    keys = ("pending_records", "processing_records", "completed_records", "failed_records")

    def shaped(counts: dict[str, int]) -> dict[str, Any]:
        out: dict[str, Any] = {k: counts.get(k, 0) for k in keys}
        other = counts.get("other_records", 0)
        if other:
            out["other_records"] = other
        out["total_records"] = sum(out[k] for k in keys) + other
        return out

    if flow_name is not None:
        return {"flow_name": flow_name, **shaped(flows.get(flow_name, {}))}
    summed = {k: sum(f.get(k, 0) for f in flows.values()) for k in (*keys, "other_records")}
    return {
        **shaped(summed),
        "by_flow": {name: shaped(c) for name, c in sorted(flows.items())},
    }

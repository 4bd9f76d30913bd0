"""One claimed batch to run, typed: what ``flow_template.process_records`` and the runners
pass around instead of a dictionary of untyped keys."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from flowfleet import queue
from flowfleet.batch import BatchOutcome, run_batch
from flowfleet.entrypoint import Processor


def _always() -> bool:
    return True


@dataclass(frozen=True)
class Processing:
    """How a process runs records: the same for every batch it claims."""

    processor: Processor
    policy: queue.RetryPolicy
    instance_id: str | None = None
    # False once records should no longer start (the end of a shutdown's grace period).
    should_continue: Callable[[], bool] = _always

    def job(
        self,
        conn: psycopg.Connection,
        records: Sequence[queue.Claimed],
        progress: BatchOutcome | None = None,
    ) -> BatchJob:
        return BatchJob(conn, records, self, progress)


@dataclass(frozen=True)
class BatchJob:
    conn: psycopg.Connection
    records: Sequence[queue.Claimed]
    processing: Processing
    # Filled record by record as the batch runs, for a reader on another thread; the
    # outcome returned is this object when given.
    progress: BatchOutcome | None = None

    def run(self, call: Callable[..., Any] | None = None) -> BatchOutcome:
        """Run every record (through ``call`` when given, else the processor itself) and
        return the outcome; completions of plain records are left to the caller."""
        p = self.processing
        return run_batch(
            self.conn,
            self.records,
            p.processor,
            p.policy,
            call=call,
            should_continue=p.should_continue,
            instance_id=p.instance_id,
            outcome=self.progress,
        )

"""The plain runner: each batch straight through the processor, no Prefect."""

from __future__ import annotations

import psycopg

from flowfleet import queue
from flowfleet.batch import BatchOutcome
from flowfleet.batchjob import Processing
from flowfleet.claimloop import BatchSequence


class PlainRunner:
    def __init__(self, processing: Processing) -> None:
        self.processing = processing

    def run_busy_stretch(self, first_batch: list[queue.Claimed], loop: BatchSequence) -> None:
        loop.process_until_idle(first_batch, self.run_batch)

    def run_batch(
        self, conn: psycopg.Connection, records: list[queue.Claimed], progress: BatchOutcome
    ) -> BatchOutcome:
        return self.processing.job(conn, records, progress).run()

"""The Prefect runner: a flow run per busy stretch (up to ``flow_run_seconds``), a task
run per batch. Idle workers create no runs; busy ones pay Prefect's overhead per batch,
not per record.

Flow runs are named ``<flow>@<pod>`` and tagged ``flowfleet``, ``flow:<flow>`` and
``pod:<pod>``, so Prefect's UI and API can filter them by pod."""

from __future__ import annotations

import asyncio
import time

import psycopg
from prefect import flow, tags

from flowfleet import queue
from flowfleet.batch import BatchOutcome
from flowfleet.batchjob import Processing
from flowfleet.claimloop import BatchSequence
from flowfleet.flow_template import run_process_records


class PrefectRunner:
    """One per claim loop: it keeps the asyncio loop of that thread, which Prefect's async
    flows reuse from one run to the next."""

    def __init__(self, flow_name: str, processing: Processing, flow_run_seconds: float) -> None:
        self.flow_name = flow_name
        self.processing = processing
        self.flow_run_seconds = flow_run_seconds
        self._event_loop: asyncio.AbstractEventLoop | None = None
        pod = processing.instance_id or "unknown"
        self.flow_run_name = f"{flow_name}@{pod}"
        self.tags = run_tags(flow_name, pod)

    def run_busy_stretch(self, first_batch: list[queue.Claimed], loop: BatchSequence) -> None:
        claimed = first_batch
        run_batch = self.run_batch_as_task
        flow_run_seconds = self.flow_run_seconds

        # A flow object per stretch (about a millisecond, against some 90 ms for the run
        # itself), so the loop and its batch reach the run by closure rather than through
        # state shared between threads.
        @flow(
            name=self.flow_name,
            flow_run_name=self.flow_run_name,
            persist_result=False,
            validate_parameters=False,
        )
        async def worker_flow(instance_id: str | None, first_batch: list[int]) -> int:
            # The parameters only label the run in Prefect: who ran it, which records began it.
            deadline = time.monotonic() + flow_run_seconds
            return loop.process_until_idle(claimed, run_batch, deadline=deadline)

        with tags(*self.tags):
            self.event_loop().run_until_complete(
                worker_flow(self.processing.instance_id, [r.id for r in claimed])
            )

    def run_batch_as_task(
        self, conn: psycopg.Connection, records: list[queue.Claimed], progress: BatchOutcome
    ) -> BatchOutcome:
        return run_process_records(self.processing.job(conn, records, progress))

    def event_loop(self) -> asyncio.AbstractEventLoop:
        if self._event_loop is None:
            self._event_loop = asyncio.new_event_loop()
        return self._event_loop


def run_tags(flow_name: str, pod: str) -> tuple[str, ...]:
    return ("flowfleet", f"flow:{flow_name}", f"pod:{pod}")

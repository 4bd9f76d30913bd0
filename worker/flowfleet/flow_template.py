"""Prefect flows around a batch: the seed's ``core.flow_template``.

``distributed_processing_flow(flow_name, batch_size=50)`` claims one batch, runs every
record through the flow's processor with failures isolated per record, records the
outcomes and returns counts. The processor is, in order: the ``processor`` argument, one
registered with ``@register_processor(flow_name)``, or the ``entrypoint`` setting
(``{ENV}_{FLOW}_ENTRYPOINT=module:function``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import psycopg
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed, State

from flowfleet import defaults, queue
from flowfleet.batch import BatchOutcome, finish
from flowfleet.batchjob import BatchJob, Processing
from flowfleet.config import ConfigManager
from flowfleet.database import DatabaseManager
from flowfleet.entrypoint import EntrypointError, Processor, describe, load

F = TypeVar("F", bound=Callable[..., Any])

_registry: dict[str, Processor] = {}


def register_processor(flow_name: str) -> Callable[[F], F]:
    """Decorator: the record processor of ``flow_name`` for ``distributed_processing_flow``."""

    def decorate(func: F) -> F:
        _registry[flow_name] = describe(func)
        return func

    return decorate


def resolve_processor(flow_name: str, processor: Callable[..., Any] | None = None) -> Processor:
    if processor is not None:
        return describe(processor)
    if flow_name in _registry:
        return _registry[flow_name]
    config = ConfigManager(flow_name)
    spec = config.get_variable("entrypoint", "")
    if spec:
        return load(spec)
    raise EntrypointError(
        f"no processor for flow {flow_name!r}: pass processor=, decorate one with "
        f"@register_processor({flow_name!r}), or set {config.candidates('entrypoint')[0]}"
        "=module:function"
    )


def _invoke_under_prefect(processor: Processor) -> Callable[..., Any]:
    # A Prefect task as processor gets a task run per record; a flow, a subflow run.
    return processor.call if processor.kind in {"task", "flow"} else processor.fn


# The state of a `process-records` task run whose every record failed (for good or to be
# retried): of type FAILED, so Prefect's UI, filters and notifications show the batch as
# failed; named apart from a task run that raised.
ALL_FAILED = "RecordsFailed"


@task(name="process-records", cache_policy=NO_CACHE, persist_result=False)
def process_records(record_ids: list[int], job: BatchJob) -> BatchOutcome | State:
    """One task run per batch: per-record outcomes go to the queue and the run's log.
    ``record_ids`` only labels the run; the records come in ``job``. Ends in a
    ``RecordsFailed`` state (type FAILED) when no record succeeded and every one failed."""
    outcome = job.run(call=_invoke_under_prefect(job.processing.processor))
    counts = outcome.counts()
    get_run_logger().info(
        "batch of %d: %d completed, %d retried, %d failed",
        len(record_ids),
        counts["completed"],
        counts["retried"],
        counts["failed"],
        extra=counts,
    )
    if all_failed(outcome):
        return Failed(
            name=ALL_FAILED,
            message=f"all {outcome.claimed} records failed: {outcome.failed} for good, "
            f"{outcome.retried} to be retried",
        )
    return outcome


def all_failed(outcome: BatchOutcome) -> bool:
    return outcome.claimed > 0 and outcome.failed + outcome.retried == outcome.claimed


def run_process_records(job: BatchJob) -> BatchOutcome:
    """Run ``process-records`` on ``job`` and return its outcome, whatever the task run's
    state says about it; an error the task raised is raised here."""
    progress = job.progress if job.progress is not None else BatchOutcome()
    if job.progress is None:
        job = replace(job, progress=progress)
    state = process_records([r.id for r in job.records], job, return_state=True)
    if state.is_failed() and state.name != ALL_FAILED:
        state.result()  # raises what the task raised
    return progress


@flow(name="distributed-processing", persist_result=False, validate_parameters=False)
def distributed_processing_flow(
    flow_name: str,
    batch_size: int = defaults.BATCH_SIZE,
    processor: Callable[..., Any] | None = None,
    db: DatabaseManager | str = "rpa_db",
) -> dict[str, Any]:
    """Claim one batch of ``flow_name`` and process it; returns ``claimed``, ``completed``,
    ``retried``, ``failed``, ``fenced`` and ``released`` counts."""
    from flowfleet.distributed import DistributedProcessor

    target = resolve_processor(flow_name, processor)
    queue.check_flow_name(flow_name)
    dp = DistributedProcessor(db if isinstance(db, DatabaseManager) else DatabaseManager(db))
    with dp.queue_db.connection() as conn:
        records = queue.claim(conn, flow_name, dp.instance_id, batch_size, dp.lease_seconds)
        counts = _process(conn, records, target, dp.policy, dp.instance_id)
    return {"flow_name": flow_name, "instance_id": dp.instance_id, **counts}


def _process(
    conn: psycopg.Connection,
    records: Sequence[queue.Claimed],
    processor: Processor,
    policy: queue.RetryPolicy,
    instance_id: str,
) -> dict[str, int]:
    if not records:
        return BatchOutcome().counts()
    job = Processing(processor, policy, instance_id).job(conn, records)
    outcome = run_process_records(job)
    counts = outcome.counts()
    fenced = len(outcome.completed) - len(finish(conn, outcome))
    counts["completed"] -= fenced
    counts["fenced"] += fenced
    return counts

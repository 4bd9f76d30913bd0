"""The operator's state and work: every DistributedFlow it serves, one loop per database.

Handlers call in here; the decisions come from the pure modules (model, scaling,
manifests, conditions); the I/O goes through queuedb and kube. No kopf timers or daemons:
the periodic depth-and-scale work runs in one asyncio task per database, so deleting a
DistributedFlow never waits on a finalizer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import kopf

from flowfleet import queue
from flowfleet.redaction import redact
from flowfleet.sql import latest_version
from flowfleet_operator import conditions as cond
from flowfleet_operator import metrics
from flowfleet_operator.dbloop import DatabaseLoop
from flowfleet_operator.flowstate import Flow, FlowKey, flow_reason, post_event
from flowfleet_operator.flowstate import utc_now as _now
from flowfleet_operator.kube import Kube, KubeError, SecretMissing, api_error_line
from flowfleet_operator.manifests import (
    DELETION_COST,
    build_worker_deployment,
    deletion_costs,
    selector_string,
)
from flowfleet_operator.model import (
    FlowSpec,
    InvalidSpec,
    parse_spec,
    prefect_api_url,
)
from flowfleet_operator.queuedb import RATE_WINDOW_SECONDS, Database, DatabaseError
from flowfleet_operator.scaling import Decision, Depth, Policy, decide
from flowfleet_operator.settings import OperatorSettings

log = logging.getLogger("flowfleet_operator")

SECRET_CHECK_S = 1.0
# How long a scale-in waits for its deletion-cost annotations to show in the pod watch.
COST_OBSERVED_TIMEOUT_S = 2.0


class Fleet:
    def __init__(self, settings: OperatorSettings, kube: Kube) -> None:
        self.settings = settings
        self.kube = kube
        self.flows: dict[FlowKey, Flow] = {}
        self.databases: dict[str, DatabaseLoop] = {}
        self.secrets_task: asyncio.Task[None] | None = None
        # Deletion costs as the pod watch last showed them, per (namespace, pod).
        self.pod_costs: dict[tuple[str, str], str | None] = {}

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self.secrets_task = asyncio.create_task(self._watch_secrets(), name="secrets")

    def healthy(self) -> bool:
        tasks = [self.secrets_task, *(d.task for d in self.databases.values())]
        return all(t is not None and not t.done() for t in tasks)

    async def stop(self) -> None:
        if self.secrets_task is not None:
            self.secrets_task.cancel()
            await asyncio.gather(self.secrets_task, return_exceptions=True)
        for loop in list(self.databases.values()):
            await loop.close()
        self.databases.clear()

    # -- reconcile (create, resume, spec change) -----------------------------------

    async def reconcile(self, body: Any) -> None:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        flow = self.flows.get(key)
        try:
            spec = parse_spec(body.get("spec") or {})
        except InvalidSpec as exc:
            if flow is None:
                flow = self._new_flow(body, None)
            flow.spec_blocked = ("InvalidSpec", str(exc))
            self._blocked(flow, "InvalidSpec", str(exc))
            await self.publish(flow)
            raise kopf.PermanentError(str(exc)) from None
        if flow is None:
            flow = self._new_flow(body, spec)
        flow.spec, flow.generation, flow.uid = spec, meta.get("generation", 1), meta["uid"]
        try:
            await self._reconcile(flow)
        except kopf.TemporaryError:
            metrics.RECONCILE_ERRORS.labels(*key, flow_reason(flow)).inc()
            raise

    def _new_flow(self, body: Any, spec: FlowSpec | None) -> Flow:
        meta = body["metadata"]
        status = dict(body.get("status") or {})
        flow = Flow(
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta["uid"],
            generation=meta.get("generation", 1),
            spec=spec or FlowSpec.model_construct(),
            # Resuming: what is already written counts as written, so a restart rewrites
            # nothing that did not change, and transition times survive.
            conditions=list(status.get("conditions") or []),
            published=status,
            schema_version=status.get("schemaVersion"),
            last_scale_time=status.get("lastScaleTime"),
            desired=status.get("desiredReplicas"),
        )
        flow.counts = {
            k: status[k]
            for k in ("pendingRecords", "processingRecords", "failedRecords", "recordsPerMinute")
            if k in status
        }
        if spec is not None:
            self.flows[flow.key] = flow
        return flow

    def _blocked(self, flow: Flow, reason: str, message: str) -> None:
        flow.conditions = cond.summarize_ready(
            flow.conditions, flow.generation, _now(), (reason, message)
        )

    def _retry(self, flow: Flow, message: str) -> kopf.TemporaryError:
        return kopf.TemporaryError(message, delay=flow.spec.poll_interval_seconds)

    async def _reconcile(self, flow: Flow) -> None:
        spec = flow.spec
        api_url = prefect_api_url(spec, self.settings.prefect_api_url)
        if spec.runner == "prefect" and not api_url:
            message = (
                "runner prefect needs a Prefect API: set spec.prefect.apiUrl or the operator's "
                "FLOWFLEET_OPERATOR_PREFECT_API_URL (or use runner plain)"
            )
            if flow_reason(flow) != "PrefectApiUrlMissing":  # one Warning per transition
                post_event(flow, type="Warning", reason="PrefectApiUrlMissing", message=message)
            self._blocked(flow, "PrefectApiUrlMissing", message)
            await self.publish(flow)
            await self._detach(flow)
            return
        ref = spec.database.secret_ref
        try:
            dsn = await self.kube.read_secret_value(flow.namespace, ref.name, ref.key)
        except SecretMissing as exc:
            await self._secret_missing(flow, str(exc))
            raise self._retry(flow, str(exc)) from None
        flow.secret_checked = time.monotonic()
        flow.secret_error = None
        loop = await self._attach(flow, dsn)
        try:
            version = await self._schema(flow, loop.db)
        except DatabaseError as exc:
            self._database_down(flow, exc)
            await self.publish(flow)
            raise self._retry(flow, str(exc)) from None
        if version < latest_version():
            message = (
                f"schema version {version}, workers need {latest_version()}; "
                "spec.database.migrate is false: run `flowfleet migrate` against this database"
            )
            flow.condition(cond.SCHEMA_READY, False, "SchemaOutdated", message)
            self._blocked(flow, "SchemaOutdated", message)
            await self.publish(flow)
            raise self._retry(flow, message)
        await self._apply_deployment(flow, api_url)
        flow.spec_blocked = None
        flow.conditions = cond.summarize_ready(flow.conditions, flow.generation, _now(), None)
        await self.publish(flow)
        loop.wake.set()

    async def _schema(self, flow: Flow, db: Database) -> int:
        if flow.spec.database.migrate:
            applied, version = await asyncio.to_thread(db.migrate)
            if applied:
                message = f"applied migrations {applied} on {db.where}: schema version {version}"
                post_event(flow, type="Normal", reason="Migrated", message=message)
                log.info("%s/%s: %s", flow.namespace, flow.name, message)
        else:
            version = await asyncio.to_thread(db.schema_version)
        flow.condition(cond.DATABASE_REACHABLE, True, "Connected", f"connected to {db.where}")
        if version >= latest_version():
            flow.condition(cond.SCHEMA_READY, True, "Current", f"schema version {version}")
        flow.schema_version = version
        return version

    async def _apply_deployment(self, flow: Flow, api_url: str | None) -> None:
        spec = flow.spec
        try:
            existing = await self.kube.get_deployment(flow.namespace, flow.name)
            if existing is not None:
                replicas = int((existing.get("spec") or {}).get("replicas") or 0)
            else:
                replicas = spec.replicas if spec.replicas is not None else spec.min_replicas
            manifest = build_worker_deployment(
                flow.name, flow.namespace, flow.uid, spec, replicas, api_url
            )
            applied = await self.kube.apply_deployment(manifest)
        except KubeError as exc:
            message = f"worker Deployment not applied: {api_error_line(exc)}"
            flow.spec_blocked = ("DeploymentFailed", message)
            self._blocked(flow, "DeploymentFailed", message)
            await self.publish(flow)
            raise self._retry(flow, message) from None
        if existing is None:
            post_event(
                flow,
                type="Normal",
                reason="DeploymentCreated",
                message=f"worker Deployment {flow.name} created with {replicas} replicas",
            )
        self.observe_deployment(flow.namespace, flow.name, applied)
        flow.deployed = True

    async def _secret_missing(self, flow: Flow, message: str) -> None:
        flow.secret_error = message
        if flow.condition(cond.DATABASE_REACHABLE, False, "SecretNotFound", message):
            post_event(flow, type="Warning", reason="SecretNotFound", message=message)
        self._blocked(flow, "SecretNotFound", message)
        await self.publish(flow)

    def _database_down(self, flow: Flow, exc: DatabaseError) -> None:
        message = str(exc)
        if flow.condition(cond.DATABASE_REACHABLE, False, exc.reason, message):
            post_event(flow, type="Warning", reason=exc.reason, message=message)
            log.warning("%s/%s: %s", flow.namespace, flow.name, message)
        self._blocked(flow, exc.reason, message)

    # -- databases ---------------------------------------------------------------------

    async def _attach(self, flow: Flow, dsn: str) -> DatabaseLoop:
        if flow.dsn != dsn:
            await self._detach(flow)
        loop = self.databases.get(dsn)
        if loop is None:
            loop = self.databases[dsn] = DatabaseLoop(self, dsn)
        loop.flows.add(flow.key)
        flow.dsn = dsn
        return loop

    async def _detach(self, flow: Flow) -> None:
        if flow.dsn is None:
            return
        loop = self.databases.get(flow.dsn)
        flow.dsn = None
        if loop is None:
            return
        loop.flows.discard(flow.key)
        if not loop.flows:
            del self.databases[loop.dsn]
            await loop.close()

    async def forget(self, namespace: str, name: str) -> None:
        """The DistributedFlow is gone: its Deployment goes by garbage collection; its
        queue records stay where they are."""
        flow = self.flows.pop((namespace, name), None)
        if flow is not None:
            await self._detach(flow)
        metrics.forget_flow(namespace, name)

    async def _watch_secrets(self) -> None:
        """Password rotation: each flow's Secret is read again every poll interval; a new
        connection string moves the flow to a pool for it, without a restart."""
        while True:
            await asyncio.sleep(SECRET_CHECK_S)
            now = time.monotonic()
            for flow in list(self.flows.values()):
                if flow.dsn is None or now - flow.secret_checked < flow.spec.poll_interval_seconds:
                    continue
                flow.secret_checked = now
                try:
                    await self._check_secret(flow)
                except Exception:  # one flow's trouble must not end the checks of all
                    log.exception("%s/%s: checking its Secret failed", *flow.key)

    async def _check_secret(self, flow: Flow) -> None:
        ref = flow.spec.database.secret_ref
        try:
            dsn = await self.kube.read_secret_value(flow.namespace, ref.name, ref.key)
        except SecretMissing as exc:
            await self._secret_missing(flow, str(exc))
            return
        except Exception as exc:
            log.warning("reading Secret %s/%s: %s", flow.namespace, ref.name, redact(str(exc)))
            return
        found_again, flow.secret_error = flow.secret_error is not None, None
        if dsn != flow.dsn:
            log.info("%s/%s: connection string changed; reconnecting", *flow.key)
            loop = await self._attach(flow, dsn)
            loop.wake.set()
        elif found_again and dsn in self.databases:
            self.databases[dsn].wake.set()

    # -- the tick -----------------------------------------------------------------------

    async def tick(self, loop: DatabaseLoop, fast: bool = False) -> None:
        flows = [self.flows[k] for k in sorted(loop.flows) if k in self.flows]
        flows = [f for f in flows if f.deployed and f.dsn == loop.dsn]
        if not flows:
            return
        started = time.perf_counter()
        names = sorted({f.spec.flow_name for f in flows})
        try:
            depths: dict[str, queue.FlowDepth] | None = await asyncio.to_thread(
                loop.db.depth, names
            )
        except DatabaseError as exc:
            depths = None
            for flow in flows:
                self._database_down(flow, exc)
        for flow in flows:
            try:
                await self.evaluate(
                    flow, None if depths is None else depths.get(flow.spec.flow_name), fast
                )
            except KubeError as exc:
                log.warning("%s/%s: %s", flow.namespace, flow.name, api_error_line(exc))
                metrics.RECONCILE_ERRORS.labels(*flow.key, "ApiError").inc()
        metrics.TICK_SECONDS.observe(time.perf_counter() - started)

    async def evaluate(
        self, flow: Flow, found: queue.FlowDepth | None, fast: bool = False
    ) -> Decision:
        spec = flow.spec
        depth = None
        if found is not None:
            depth = Depth(
                ready=found.ready,
                processing=found.processing,
                pending=found.pending,
                failed=found.failed,
                busy_pods=found.busy_instances,
                completions_per_minute=found.completed_recently * 60.0 / RATE_WINDOW_SECONDS,
                completing_pods=found.completing_instances,
            )
        policy = Policy(
            min_replicas=spec.min_replicas,
            max_replicas=spec.max_replicas,
            records_per_replica=spec.records_per_replica,
            scale_down_delay_seconds=spec.scale_down_delay_seconds,
            target_drain_seconds=spec.target_drain_seconds,
            pinned=spec.replicas,
        )
        decision = decide(policy, depth, flow.replicas, flow.history, time.monotonic())
        flow.history = decision.history
        changed = decision.replicas != flow.desired
        if decision.replicas != flow.replicas:
            await self._scale(flow, decision)
        # Only now: a status written meanwhile (a Deployment event) shows the old picture
        # whole rather than the new count beside old conditions.
        flow.desired = decision.replicas
        if flow.secret_error is not None:
            flow.condition(cond.DATABASE_REACHABLE, False, "SecretNotFound", flow.secret_error)
        elif depth is not None:
            flow.condition(
                cond.DATABASE_REACHABLE, True, "Connected", f"connected to {self._where(flow)}"
            )
        if depth is not None:
            flow.counts = {
                "pendingRecords": depth.pending,
                "processingRecords": depth.processing,
                "failedRecords": depth.failed,
                "recordsPerMinute": round(depth.completions_per_minute or 0.0, 1),
            }
            active = depth.pending + depth.processing > 0 or flow.replicas > 0
            flow.condition(
                cond.ACTIVE,
                active,
                "Working" if active else "Idle",
                f"{depth.ready} ready, {depth.processing} processing, {flow.replicas} replicas",
            )
            metrics.PENDING.labels(*flow.key).set(depth.pending)
            metrics.PROCESSING.labels(*flow.key).set(depth.processing)
        if decision.limit is not None:
            flow.condition(cond.SCALING_LIMITED, True, *decision.limit)
        else:
            flow.condition(
                cond.SCALING_LIMITED,
                False,
                "WithinLimits",
                "desired replicas within [minReplicas, maxReplicas]",
            )
        metrics.DESIRED.labels(*flow.key).set(decision.replicas)
        flow.conditions = cond.summarize_ready(
            flow.conditions, flow.generation, _now(), flow.spec_blocked
        )
        # A fast-path tick writes status only when the decision changed; the periodic one
        # keeps the counts current. Either way only what changed is written.
        if not fast or changed:
            await self.publish(flow)
        return decision

    def _where(self, flow: Flow) -> str:
        loop = self.databases.get(flow.dsn or "")
        return loop.db.where if loop else "the database"

    async def _scale(self, flow: Flow, decision: Decision) -> None:
        before = flow.replicas
        if decision.replicas < before:
            await self._mark_idle_pods(flow)
        await self.kube.scale_deployment(flow.namespace, flow.name, decision.replicas)
        flow.replicas = decision.replicas
        flow.expected_generation = flow.deployment_generation + 1
        flow.last_scale_time = _now()
        direction = "up" if decision.replicas > before else "down"
        metrics.SCALE_EVENTS.labels(*flow.key, direction).inc()
        reason = decision.reason if decision.reason != "Steady" else "Scaled"
        post_event(flow, type="Normal", reason=reason, message=decision.message)
        log.info("%s/%s scaled: %s", flow.namespace, flow.name, decision.message)

    async def _mark_idle_pods(self, flow: Flow) -> None:
        """Just before a scale-in, set each pod's deletion cost to its in-flight count so
        the ReplicaSet removes idle pods first. Only now, never every tick."""
        loop = self.databases.get(flow.dsn or "")
        if loop is None:
            return
        try:
            in_flight = await asyncio.to_thread(loop.db.in_flight, flow.spec.flow_name)
        except DatabaseError:
            return  # the ReplicaSet's own order then; scaling in is not held up
        pods = await self.kube.list_pods(flow.namespace, selector_string(flow.name))
        live = {
            p["metadata"]["name"]: (p["metadata"].get("annotations") or {})
            for p in pods
            if not p["metadata"].get("deletionTimestamp")
        }
        patched: dict[str, str] = {}
        for pod, cost in deletion_costs(list(live), in_flight).items():
            if live[pod].get(DELETION_COST) != str(cost):
                await self.kube.annotate_pod(flow.namespace, pod, {DELETION_COST: str(cost)})
                patched[pod] = str(cost)
        # The ReplicaSet controller reads pods from its watch, as we do: once our own watch
        # shows the new costs, its one has them too (or is about to), and replicas may drop.
        deadline = time.monotonic() + COST_OBSERVED_TIMEOUT_S
        while patched and time.monotonic() < deadline:
            if all(self.pod_costs.get((flow.namespace, p)) == c for p, c in patched.items()):
                break
            await asyncio.sleep(0.02)

    # -- observed children ------------------------------------------------------------

    def observe_deployment(self, namespace: str, name: str, body: Any) -> None:
        flow = self.flows.get((namespace, name))
        if flow is None:
            return
        spec_replicas = int((body.get("spec") or {}).get("replicas") or 0)
        generation = int((body.get("metadata") or {}).get("generation") or 0)
        status = body.get("status") or {}
        flow.deployment_generation = max(flow.deployment_generation, generation)
        # The watch lags our own writes: an event from before our last scale must not
        # roll our count back. A change by anyone else bumps the generation past it.
        if generation >= flow.expected_generation:
            flow.replicas = spec_replicas
        flow.pods = int(status.get("replicas") or 0)
        flow.ready_pods = int(status.get("readyReplicas") or 0)
        metrics.REPLICAS.labels(namespace, name).set(flow.pods)

    async def deployment_changed(self, namespace: str, name: str, body: Any) -> None:
        flow = self.flows.get((namespace, name))
        if flow is None or not flow.deployed:
            return
        self.observe_deployment(namespace, name, body)
        await self.publish(flow)

    def pod_seen(self, namespace: str, pod: str, annotations: dict[str, str]) -> None:
        self.pod_costs[(namespace, pod)] = annotations.get(DELETION_COST)

    async def pod_deleted(self, namespace: str, pod: str, labels: dict[str, str]) -> None:
        """A worker pod is gone: its claims go back to pending now, not after the lease."""
        self.pod_costs.pop((namespace, pod), None)
        flow = self.flows.get((namespace, labels.get("app.kubernetes.io/instance", "")))
        if flow is None or flow.dsn is None:
            return
        loop = self.databases.get(flow.dsn)
        if loop is None:
            return
        try:
            released = await asyncio.to_thread(loop.db.release_instance, flow.spec.flow_name, pod)
        except DatabaseError as exc:
            log.warning(
                "%s/%s: claims of pod %s stay until their lease ends: %s",
                namespace,
                flow.name,
                pod,
                exc,
            )
            return
        if released:
            metrics.CLAIMS_RELEASED.labels(*flow.key).inc(len(released))
            message = f"pod {pod} is gone: {len(released)} records it held are back in the queue"
            post_event(flow, type="Normal", reason="ClaimsReleased", message=message)
            log.info("%s/%s: %s", namespace, flow.name, message)
            loop.wake.set()

    # -- status -------------------------------------------------------------------------

    async def publish(self, flow: Flow) -> None:
        async with flow.publishing:
            status = self._status(flow)
            if all(flow.published.get(k) == v for k, v in status.items()):
                return
            try:
                await self.kube.patch_flow_status(flow.namespace, flow.name, status)
            except KubeError as exc:
                if exc.status != 404:  # deleted meanwhile: nothing to report to
                    log.warning(
                        "%s/%s: status not written: %s",
                        flow.namespace,
                        flow.name,
                        api_error_line(exc),
                    )
                return
            flow.published = {**flow.published, **status}

    def _status(self, flow: Flow) -> dict[str, Any]:
        status: dict[str, Any] = {
            **flow.counts,
            "replicas": flow.pods,
            "readyReplicas": flow.ready_pods,
            "desiredReplicas": flow.desired if flow.desired is not None else flow.replicas,
            "observedGeneration": flow.generation,
            "selector": selector_string(flow.name),
            "conditions": flow.conditions,
        }
        if flow.schema_version is not None:
            status["schemaVersion"] = flow.schema_version
        if flow.last_scale_time is not None:
            status["lastScaleTime"] = flow.last_scale_time
        return status

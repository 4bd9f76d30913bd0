"""The node agent: one loop on the main thread owns every process (so the kernel's
parent-death signal ties them to the agent's life); a watch thread feeds it the pods
bound to this node; a heartbeat thread renews the node's Lease."""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import watch

from localnode.kube import Kube
from localnode.node import NodeRegistration
from localnode.pod import NodeContext, PodRun

log = logging.getLogger("localnode.agent")

TICK_SECONDS = 0.1
WATCH_SECONDS = 30  # each watch ends after this and the agent relists: a cheap resync


class PodWatch(threading.Thread):
    """List, then watch, the pods bound to this node; every event goes to ``events``."""

    def __init__(self, kube: Kube, events: queue.Queue[tuple[str, Any]]) -> None:
        super().__init__(name="pod-watch", daemon=True)
        self.kube = kube
        self.events = events
        self.stopping = threading.Event()
        self._watch: watch.Watch | None = None

    def run(self) -> None:
        selector = f"spec.nodeName={self.kube.node_name}"
        while not self.stopping.is_set():
            try:
                items, version = self.kube.pods_on_node()
                self.events.put(("SYNC", items))
                self._watch = watch.Watch()
                for event in self._watch.stream(
                    self.kube.core.list_pod_for_all_namespaces,
                    field_selector=selector,
                    resource_version=version,
                    timeout_seconds=WATCH_SECONDS,
                    # The server ends the watch after WATCH_SECONDS; a dead server would
                    # leave the read hanging without a client-side timeout.
                    _request_timeout=WATCH_SECONDS + 15,
                    deserialize=False,
                ):
                    if self.stopping.is_set():
                        break
                    if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                        self.events.put((event["type"], event["object"]))
            except Exception as exc:  # expired watch, API restart: relist
                if not self.stopping.is_set():
                    log.warning("pod watch: %s; relisting", exc)
                    self.stopping.wait(1)

    def stop(self) -> None:
        self.stopping.set()
        if self._watch is not None:
            self._watch.stop()


class Agent:
    def __init__(self, ctx: NodeContext, registration: NodeRegistration, keep_node: bool) -> None:
        self.ctx = ctx
        self.registration = registration
        self.keep_node = keep_node
        self.runs: dict[str, PodRun] = {}  # by pod uid
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.watcher = PodWatch(ctx.kube, self.events)
        self.stop_requested = threading.Event()
        self.on_ready: Callable[[], None] = lambda: None

    # ------------------------------------------------------------- events ----

    def _seen(self, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        run = self.runs.get(uid)
        if run is None:
            phase = (pod.get("status") or {}).get("phase")
            if phase in ("Succeeded", "Failed") and not pod["metadata"].get("deletionTimestamp"):
                return  # finished before we (re)started: nothing to run
            if pod["metadata"].get("deletionTimestamp") and phase in ("Succeeded", "Failed"):
                self.ctx.kube.delete_pod_now(pod)
                return
            run = self.runs[uid] = PodRun(pod, self.ctx)
            log.info("%s: accepted (uid %s)", run.key, uid)
        run.update(pod)

    def _apply(self, kind: str, payload: Any) -> None:
        if kind == "SYNC":
            present = {p["metadata"]["uid"] for p in payload}
            for pod in payload:
                self._seen(pod)
            for uid, run in self.runs.items():
                if uid not in present and not run.gone:
                    run.vanished(None)
        elif kind == "DELETED":
            gone = self.runs.get(payload["metadata"]["uid"])
            if gone is not None and not gone.gone:
                gone.vanished(payload)
        else:
            self._seen(payload)

    # --------------------------------------------------------------- loop ----

    def run(self) -> None:
        self.registration.register()
        self.registration.start_heartbeat()
        self.watcher.start()
        self.on_ready()
        log.info("node %s ready; state in %s", self.registration.name, self.ctx.state_dir)
        try:
            while not self.stop_requested.is_set():
                self._tick()
        finally:
            self.shutdown()

    def _tick(self, wait: float = TICK_SECONDS) -> None:
        try:
            kind, payload = self.events.get(timeout=wait)
            self._apply(kind, payload)
            while True:
                kind, payload = self.events.get_nowait()
                self._apply(kind, payload)
        except queue.Empty:
            pass
        now = time.monotonic()
        for uid, run in list(self.runs.items()):
            try:
                run.step(now)
            except Exception:
                log.exception("%s: step failed; retrying next tick", run.key)
            if run.finished:
                del self.runs[uid]

    def shutdown(self) -> None:
        """Stop every process (TERM, KILL after each pod's grace), then say goodbye:
        cordon first so no new pod is bound here meanwhile, delete the pods, the lease
        and the node (unless keep_node: then a restarted agent takes them over)."""
        log.info("stopping: %d pods", len(self.runs))
        try:
            self.registration.cordon()
        except Exception as exc:
            log.warning("cordon failed: %s", exc)
        self.watcher.stop()
        for run in self.runs.values():
            run.gone = run.gone or self.keep_node  # keep_node: leave the pod objects be
            run.terminate(run.grace_seconds(), "node agent stopping")
        while self.runs:
            now = time.monotonic()
            for uid, run in list(self.runs.items()):
                try:
                    run.step(now)
                except Exception:
                    # The API server may be gone already: the processes must go anyway.
                    log.exception("%s: stop step failed", run.key)
                    for container in run.containers:
                        container.kill(signal.SIGKILL)
                if run.finished:
                    del self.runs[uid]
            time.sleep(TICK_SECONDS)
        self.registration.stop_heartbeat()
        if not self.keep_node:
            try:
                self.registration.deregister()
            except Exception as exc:
                log.warning("could not delete node %s: %s", self.registration.name, exc)
        self.ctx.pool.shutdown(wait=False, cancel_futures=True)
        log.info("stopped; no process left")


def build_context(
    kube: Kube,
    registration: NodeRegistration,
    state_dir: Path,
    flowfleet: str,
    python: str,
    backoff: Any,
    base_env: dict[str, str],
    server: str,
    ca_file: str,
) -> NodeContext:
    return NodeContext(
        kube=kube,
        node_name=registration.name,
        host_ip=registration.host_ip,
        resources=registration.resources,
        flowfleet=flowfleet,
        python=python,
        state_dir=state_dir,
        backoff=backoff,
        pool=ThreadPoolExecutor(max_workers=8, thread_name_prefix="probe"),
        base_env=base_env,
        server=server,
        ca_file=ca_file,
    )

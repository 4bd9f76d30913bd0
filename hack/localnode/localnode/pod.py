"""One pod bound to this node: its containers as processes, its status as a kubelet
writes it, and its end (SIGTERM, SIGKILL after the grace period, the final delete)."""

from __future__ import annotations

import json
import logging
import signal
import socket
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localnode import podspec, probes, timefmt
from localnode.container import Backoff, ContainerRun
from localnode.kube import PORTS_ANNOTATION, Kube

log = logging.getLogger("localnode.pod")

# A kubelet never gives less than this, even to a force-deleted pod (its killContainer
# raises smaller grace periods to 2 s).
MIN_GRACE_SECONDS = 2.0
DEFAULT_GRACE_SECONDS = 30.0
CONFIG_RETRY_SECONDS = 2.0
POD_IP = "127.0.0.1"


@dataclass
class NodeContext:
    """What every pod on this node shares."""

    kube: Kube
    node_name: str
    host_ip: str
    resources: podspec.NodeResources
    flowfleet: str
    python: str
    state_dir: Path
    backoff: Backoff
    pool: ThreadPoolExecutor
    base_env: dict[str, str] = field(default_factory=dict)
    server: str = ""
    ca_file: str = ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pod_key(pod: Mapping[str, Any]) -> str:
    return f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"


class PodRun:
    def __init__(self, pod: dict[str, Any], ctx: NodeContext) -> None:
        meta = pod["metadata"]
        self.pod = pod
        self.ctx = ctx
        self.uid: str = meta["uid"]
        self.key = pod_key(pod)
        self.dir = ctx.state_dir / "pods" / f"{meta['namespace']}_{meta['name']}_{self.uid[:8]}"
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "home").mkdir(exist_ok=True)
        (self.dir / "tmp").mkdir(exist_ok=True)
        (self.dir / "uid").write_text(self.uid + "\n")
        image_id = f"localnode://{ctx.flowfleet}"
        self.init_containers = [
            ContainerRun(spec, self.dir, ctx.backoff, ctx.pool, image_id)
            for spec in pod["spec"].get("initContainers") or []
        ]
        self.containers = [
            ContainerRun(spec, self.dir, ctx.backoff, ctx.pool, image_id)
            for spec in pod["spec"]["containers"]
        ]
        # Init containers run again after a takeover: their processes died with the old
        # agent, as a kubelet reruns them in a new sandbox.
        self.initialized = not self.init_containers
        self.init_failed = False  # one failed under restartPolicy Never: the pod Failed
        previous = {s["name"]: s for s in (pod.get("status") or {}).get("containerStatuses") or []}
        for container in self.containers:
            container.adopt(previous.get(container.name))
        # Containers of a pod share its network: one mapping per pod, kept across restarts.
        self.ports: dict[int, int] = {}
        self.start_time = (pod.get("status") or {}).get("startTime") or timefmt.rfc3339()
        self.terminating = False
        self.kill_at = 0.0  # monotonic, when terminating
        self.killed = False
        self.gone = False  # the object is no longer in the API
        self.finished = False
        self.kill_deadlines: dict[str, float] = {}  # container -> SIGKILL time (liveness)
        self.transitions: dict[str, tuple[str, str]] = {}  # condition -> (status, since)
        self.last_status: dict[str, Any] | None = None
        self.announced_ports: dict[int, int] = {}

    # ------------------------------------------------------------- inputs ----

    def update(self, pod: dict[str, Any]) -> None:
        self.pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            grace = pod["metadata"].get("deletionGracePeriodSeconds")
            self.terminate(DEFAULT_GRACE_SECONDS if grace is None else float(grace), "deleted")

    def vanished(self, last: dict[str, Any] | None) -> None:
        """Deleted from the API without us (a force delete): stop its processes."""
        self.gone = True
        if last is not None:
            self.pod = last
        grace = self.pod["metadata"].get("deletionGracePeriodSeconds")
        self.terminate(0.0 if grace is None else float(grace), "force-deleted")

    def terminate(self, grace: float, why: str) -> None:
        """SIGTERM now, SIGKILL after the grace period; a shorter grace (a second delete
        with a smaller one) moves the SIGKILL earlier, never later."""
        deadline = time.monotonic() + max(grace, MIN_GRACE_SECONDS)
        if self.terminating:
            self.kill_at = min(self.kill_at, deadline)
            return
        self.terminating = True
        self.kill_at = deadline
        running = [c for c in self.every_container if c.running]
        for container in running:
            container.kill(signal.SIGTERM)
        if running and not self.gone:
            names = ", ".join(c.name for c in running)
            self.ctx.kube.event(
                self.pod,
                "Killing",
                f"Stopping container {names} ({why}; grace {max(grace, MIN_GRACE_SECONDS):g}s)",
            )
        log.info("%s: terminating (%s, grace %gs)", self.key, why, grace)

    # -------------------------------------------------------------- step ----

    def step(self, now: float) -> None:
        if self.last_status is None and not self.terminating:
            self.write_status()  # Pending, accepted by this node, before anything starts
            return
        dirty = False
        if not self.initialized:
            dirty |= self._step_init(now)
        else:
            for container in self.containers:
                dirty |= self._step_container(container, now)
        if self.terminating:
            if not self.killed and now >= self.kill_at:
                self.killed = True
                for container in self.every_container:
                    if container.running:
                        log.info(
                            "%s: %s outlived its grace period; SIGKILL", self.key, container.name
                        )
                        container.kill(signal.SIGKILL)
            if not any(c.running for c in self.every_container):
                self._finish()
                return
        if dirty or self.status() != self.last_status:
            self.write_status()

    @property
    def every_container(self) -> list[ContainerRun]:
        return [*self.init_containers, *self.containers]

    def _step_init(self, now: float) -> bool:
        """Init containers one at a time, in order, each to a successful exit; a failed
        one is restarted (with back-off) unless the pod's restartPolicy is Never."""
        for container in self.init_containers:
            if container.succeeded:
                continue
            ended = container.poll()
            if ended is not None:
                log.info("%s: init %s exited %d", self.key, container.name, ended.exit_code)
                if ended.exit_code == 0:
                    container.succeeded = True
                elif self.terminating:
                    pass
                elif (self.pod["spec"].get("restartPolicy") or "Always") == "Never":
                    self.init_failed = True
                else:
                    delay = container.schedule_restart(now)
                    container.restart_pending = True
                    if delay:
                        self.ctx.kube.event(
                            self.pod, "BackOff", container.waiting_message, warning=True
                        )
                return True
            if container.running or self.terminating or self.init_failed:
                return False
            may_start = not container.ever_started or container.restart_pending
            if may_start and now >= container.next_start_at:
                return self._start(container, now)
            return False
        self.initialized = True
        return True

    def _step_container(self, container: ContainerRun, now: float) -> bool:
        ended = container.poll()
        if ended is not None:
            self.kill_deadlines.pop(container.name, None)
            log.info("%s: %s exited %d", self.key, container.name, ended.exit_code)
            if not self.terminating and self._restarts(ended.exit_code):
                delay = container.schedule_restart(now)
                container.restart_pending = True
                if delay:
                    self.ctx.kube.event(
                        self.pod, "BackOff", container.waiting_message, warning=True
                    )
            return True
        if self.terminating:
            return False
        if container.running:
            changed = container.step_probes(now)
            deadline = self.kill_deadlines.get(container.name)
            if deadline is None:
                failed = container.failed_probe()
                if failed is not None:
                    self._restart_unhealthy(container, failed, now)
                    changed = True
            elif now >= deadline:
                container.kill(signal.SIGKILL)
            return changed
        may_start = not container.ever_started or container.restart_pending
        if may_start and now >= container.next_start_at:
            return self._start(container, now)
        return False

    def _restarts(self, exit_code: int) -> bool:
        policy = self.pod["spec"].get("restartPolicy") or "Always"
        return policy == "Always" or (policy == "OnFailure" and exit_code != 0)

    def _restart_unhealthy(
        self, container: ContainerRun, failed: probes.Prober, now: float
    ) -> None:
        message = f"{failed.kind.capitalize()} probe failed: {failed.last_message}"
        self.ctx.kube.event(self.pod, "Unhealthy", message, warning=True)
        self.ctx.kube.event(
            self.pod,
            "Killing",
            f"Container {container.name} failed {failed.kind} probe, will be restarted",
        )
        log.info("%s: %s; restarting %s", self.key, message, container.name)
        grace = float(
            container.spec.get(f"{failed.kind}Probe", {}).get("terminationGracePeriodSeconds")
            or self.grace_seconds()
        )
        self.kill_deadlines[container.name] = now + max(grace, MIN_GRACE_SECONDS)
        container.probers = {}  # no verdicts on a process that is being stopped
        container.kill(signal.SIGTERM)

    def grace_seconds(self) -> float:
        grace = self.pod["spec"].get("terminationGracePeriodSeconds")
        return DEFAULT_GRACE_SECONDS if grace is None else float(grace)

    def _remap(self, port: int) -> int:
        """A free local port for a container port the process can be told about."""
        if port not in self.ports:
            self.ports[port] = free_port()
        return self.ports[port]

    def _local(self, port: int) -> int:
        """Where a container port listens here: its remapped port, else itself (a
        process that cannot be told binds the port it was written for, as on a node of
        its own; two such pods on one machine would collide, workers never do)."""
        return self.ports.setdefault(port, port)

    def _start(self, container: ContainerRun, now: float) -> bool:
        try:
            refusal = podspec.unsupported(self.pod)
            if refusal:
                raise podspec.ConfigError(refusal)
            env = {
                **self.ctx.base_env,
                "HOSTNAME": self.pod["metadata"]["name"],
                "HOME": str(self.dir / "home"),
                # The image's /tmp is the container's own; here each pod has one.
                "TMPDIR": str(self.dir / "tmp"),
                "PREFECT_HOME": str(self.dir / "tmp" / "prefect"),
                **self._service_account_env(),
                **podspec.resolve_env(self.pod, container.spec, self.ctx.kube, self.ctx.resources),
            }
            argv = podspec.command_line(container.spec, env, self.ctx.flowfleet, self.ctx.python)
            argv = podspec.map_http_port(argv, env, self._remap)
            checks = self._probe_checks(container, env)
        except podspec.ConfigError as exc:
            before = (container.waiting_reason, container.waiting_message)
            container.waiting_reason, container.waiting_message = (
                "CreateContainerConfigError",
                str(exc),
            )
            container.next_start_at = now + CONFIG_RETRY_SECONDS
            if before != (container.waiting_reason, container.waiting_message):
                self.ctx.kube.event(self.pod, "Failed", f"Error: {exc}", warning=True)
                return True
            return False
        try:
            container.start(argv, env, checks)
        except OSError as exc:
            container.waiting_reason, container.waiting_message = "RunContainerError", str(exc)
            container.next_start_at = now + CONFIG_RETRY_SECONDS
            return True
        container.restart_pending = False
        log.info(
            "%s: started %s (pid %s)",
            self.key,
            container.name,
            container.proc.pid if container.proc else "?",
        )
        self.ctx.kube.event(self.pod, "Started", f"Started container {container.name}")
        self._announce_ports()
        return True

    def _service_account_env(self) -> dict[str, str]:
        """A pod that mounts its service account token gets a kubeconfig with that token
        instead (there is no /var/run/secrets here): clients that try in-cluster config
        first (the kubernetes client, kopf) find no KUBERNETES_SERVICE_HOST and fall back
        to KUBECONFIG, so the pod talks to the API server as its own service account."""
        spec = self.pod["spec"]
        if spec.get("automountServiceAccountToken") is False or not self.ctx.server:
            return {}
        account = spec.get("serviceAccountName") or "default"
        token = self.ctx.kube.service_account_token(
            self.pod["metadata"]["namespace"], account, self.pod
        )
        if token is None:
            raise podspec.ConfigError(f'serviceaccount "{account}" not found')
        path = self.dir / "kubeconfig"
        path.touch(mode=0o600)
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "c",
                            "cluster": {
                                "server": self.ctx.server,
                                "certificate-authority": self.ctx.ca_file,
                            },
                        }
                    ],
                    "users": [{"name": account, "user": {"token": token}}],
                    "contexts": [
                        {
                            "name": "c",
                            "context": {
                                "cluster": "c",
                                "user": account,
                                "namespace": self.pod["metadata"]["namespace"],
                            },
                        }
                    ],
                    "current-context": "c",
                }
            )
        )
        return {"KUBECONFIG": str(path)}

    def _probe_checks(
        self, container: ContainerRun, env: Mapping[str, str]
    ) -> dict[str, probes.Check]:
        checks: dict[str, probes.Check] = {}
        for kind in ("startup", "liveness", "readiness"):
            spec = container.spec.get(f"{kind}Probe")
            if not spec:
                continue
            timeout = float(spec.get("timeoutSeconds") or 1)
            if "httpGet" in spec:
                get = spec["httpGet"]
                port = self._local(podspec.container_port(container.spec, get["port"]))
                headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
                checks[kind] = probes.http_check(port, get.get("path") or "/", timeout, headers)
            elif "tcpSocket" in spec:
                port = self._local(
                    podspec.container_port(container.spec, spec["tcpSocket"]["port"])
                )
                checks[kind] = probes.tcp_check(port, timeout)
            elif "exec" in spec:
                argv = podspec.command_line(
                    {"command": spec["exec"]["command"]}, env, self.ctx.flowfleet, self.ctx.python
                )
                checks[kind] = probes.exec_check(argv, env, str(self.dir), timeout)
            else:
                raise podspec.ConfigError(f"{kind} probe of {container.name}: unsupported handler")
        return checks

    def _announce_ports(self) -> None:
        """Where each container port listens on this machine: in the state dir and on
        the pod, so people and tests can reach a pod's /metrics."""
        if self.ports == self.announced_ports or self.gone:
            return
        self.announced_ports = dict(self.ports)
        mapping = {str(k): v for k, v in sorted(self.ports.items())}
        (self.dir / "ports.json").write_text(json.dumps(mapping) + "\n")
        self.ctx.kube.annotate_pod(self.pod, {PORTS_ANNOTATION: json.dumps(mapping)})

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        if not self.gone:
            self.write_status()
            self.ctx.kube.delete_pod_now(self.pod)
        log.info("%s: gone; no process left", self.key)

    # ------------------------------------------------------------- status ----

    def phase(self) -> str:
        if self.init_failed:
            return "Failed"
        if not any(c.ever_started for c in self.containers):
            if self.terminating and not any(c.running for c in self.every_container):
                return "Failed"  # deleted before it ran
            return "Pending"
        done = self.terminating or all(
            not c.running and not c.restart_pending and c.last_exit is not None
            for c in self.containers
        )
        if done and not any(c.running for c in self.containers):
            exits = [c.last_exit.exit_code for c in self.containers if c.last_exit is not None]
            return (
                "Succeeded"
                if exits and not any(exits) and len(exits) == len(self.containers)
                else "Failed"
            )
        return "Running"

    def _condition(self, kind: str, value: bool) -> dict[str, str]:
        text = "True" if value else "False"
        previous = self.transitions.get(kind)
        if previous is None or previous[0] != text:
            self.transitions[kind] = (text, timefmt.rfc3339())
        return {"type": kind, "status": text, "lastTransitionTime": self.transitions[kind][1]}

    def status(self) -> dict[str, Any]:
        phase = self.phase()
        final = phase in ("Succeeded", "Failed")
        ready = (
            phase == "Running" and not self.terminating and all(c.ready for c in self.containers)
        )
        conditions = [
            c
            for c in (self.pod.get("status") or {}).get("conditions") or []
            if c["type"] == "PodScheduled"
        ]
        conditions += [
            self._condition("PodReadyToStartContainers", not final),
            self._condition("Initialized", self.initialized),
            self._condition("ContainersReady", ready),
            self._condition("Ready", ready),
        ]
        status: dict[str, Any] = {
            "phase": phase,
            "conditions": conditions,
            "hostIP": self.ctx.host_ip,
            "hostIPs": [{"ip": self.ctx.host_ip}],
            "podIP": POD_IP,
            "podIPs": [{"ip": POD_IP}],
            "startTime": self.start_time,
            "containerStatuses": [self._main_status(c, final) for c in self.containers],
        }
        if self.init_containers:
            status["initContainerStatuses"] = [c.status(final) for c in self.init_containers]
        return status

    def _main_status(self, container: ContainerRun, final: bool) -> dict[str, Any]:
        status = container.status(final)
        if not self.initialized and "waiting" in status["state"]:
            status["state"] = {"waiting": {"reason": "PodInitializing"}}
        return status

    def write_status(self) -> None:
        if self.gone:
            return
        status = self.status()
        if self.ctx.kube.patch_pod_status(self.pod, status):
            self.last_status = status
        else:
            self.last_status = status  # gone or replaced: nothing more to say about it

    def running_pids(self) -> list[int]:
        return [c.proc.pid for c in self.every_container if c.proc is not None]

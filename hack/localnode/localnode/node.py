"""The Node object: registration with this machine's capacity, the Ready condition, the
kube-node-lease Lease a kubelet renews, and the goodbye (cordon, then delete)."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import socket
import threading
from pathlib import Path
from typing import Any

from kubernetes.client.rest import ApiException

from localnode import VERSION, timefmt
from localnode.kube import MERGE_PATCH, TIMEOUT, Kube
from localnode.podspec import NodeResources

log = logging.getLogger("localnode.node")

LEASE_NAMESPACE = "kube-node-lease"
LEASE_SECONDS = 40  # a kubelet's default; the node lifecycle controller's grace is longer
RENEW_SECONDS = 10  # a kubelet renews at a quarter of the lease
STATUS_SECONDS = 60  # Ready's heartbeat; the lease is what says "alive"
# Added by the TaintNodesByCondition admission plugin to every new Node, removed once
# the node is Ready (by the node lifecycle controller, within its 5 s monitor period;
# the agent removes it itself right away, so the first pod is scheduled at once).
NOT_READY_TAINT = "node.kubernetes.io/not-ready"
LABEL = "flowfleet.io/localnode"
MAX_PODS = 110


def _read(path: str, default: str = "") -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return default


def machine_resources() -> NodeResources:
    mem_kib = 0
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return NodeResources(cpu=os.cpu_count() or 1, memory_bytes=mem_kib * 1024)


def os_image() -> str:
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return platform.platform()


def arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


class NodeRegistration:
    def __init__(self, kube: Kube, name: str, state_dir: Path, kubelet_version: str) -> None:
        self.kube = kube
        self.name = name
        self.state_dir = state_dir
        self.kubelet_version = kubelet_version
        self.resources = machine_resources()
        self.host_ip = "127.0.0.1"
        self.kubelet_port = 0  # the log endpoint (logserver.py); 0: none
        self._stop = threading.Event()
        self._ready_since = timefmt.rfc3339()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ manifest ----

    def capacity(self) -> dict[str, str]:
        disk = shutil.disk_usage(self.state_dir)
        return {
            "cpu": str(self.resources.cpu),
            "memory": f"{self.resources.memory_bytes // 1024}Ki",
            "pods": str(MAX_PODS),
            "ephemeral-storage": f"{disk.total // 1024}Ki",
        }

    def status(self) -> dict[str, Any]:
        stamp = timefmt.rfc3339()

        def condition(
            kind: str, value: str, reason: str, message: str, since: str
        ) -> dict[str, str]:
            return {
                "type": kind,
                "status": value,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": stamp,
                "lastTransitionTime": since,
            }

        since = self._ready_since
        machine_id = _read("/etc/machine-id", "unknown")
        return {
            "capacity": self.capacity(),
            "allocatable": self.capacity(),
            "conditions": [
                condition(
                    "MemoryPressure",
                    "False",
                    "KubeletHasSufficientMemory",
                    "localnode has sufficient memory available",
                    since,
                ),
                condition(
                    "DiskPressure",
                    "False",
                    "KubeletHasNoDiskPressure",
                    "localnode has no disk pressure",
                    since,
                ),
                condition(
                    "PIDPressure",
                    "False",
                    "KubeletHasSufficientPID",
                    "localnode has sufficient PID available",
                    since,
                ),
                condition(
                    "Ready", "True", "KubeletReady", "localnode is posting ready status", since
                ),
            ],
            "addresses": [
                {"type": "InternalIP", "address": self.host_ip},
                {"type": "Hostname", "address": socket.gethostname()},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.kubelet_port}},
            "nodeInfo": {
                "machineID": machine_id,
                "systemUUID": _read("/sys/class/dmi/id/product_uuid", machine_id),
                "bootID": _read("/proc/sys/kernel/random/boot_id"),
                "kernelVersion": platform.release(),
                "osImage": os_image(),
                "containerRuntimeVersion": f"localnode://{VERSION}",
                "kubeletVersion": self.kubelet_version,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": arch(),
            },
        }

    def manifest(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": {
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": arch(),
                    LABEL: "true",
                },
            },
            "spec": {},
            "status": self.status(),
        }

    # ----------------------------------------------------------- lifecycle ----

    def register(self) -> None:
        try:
            self.kube.post("/api/v1/nodes", self.manifest())
            log.info("registered node %s", self.name)
        except ApiException as exc:
            if exc.status != 409:
                raise
            # Left by an agent that died: take it over, as a restarted kubelet does.
            log.info("node %s exists; taking it over", self.name)
        self.post_status()
        self.renew_lease()
        self.make_schedulable()

    def post_status(self) -> None:
        self.kube.core.patch_node_status(
            self.name, {"status": self.status()}, _content_type=MERGE_PATCH, **TIMEOUT
        )

    def make_schedulable(self) -> None:
        node = self.kube.raw(self.kube.core.read_node(self.name, _preload_content=False, **TIMEOUT))
        taints = node["spec"].get("taints") or []
        kept = [t for t in taints if t["key"] != NOT_READY_TAINT]
        if kept != taints or node["spec"].get("unschedulable"):
            patch = {"spec": {"taints": kept or None, "unschedulable": None}}
            self.kube.core.patch_node(self.name, patch, _content_type=MERGE_PATCH, **TIMEOUT)

    def lease_body(self) -> dict[str, Any]:
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": LEASE_NAMESPACE},
            "spec": {
                "holderIdentity": self.name,
                "leaseDurationSeconds": LEASE_SECONDS,
                "renewTime": timefmt.micro(),
            },
        }

    def renew_lease(self) -> None:
        coordination = self.kube.coordination
        body = self.lease_body()
        try:
            coordination.patch_namespaced_lease(
                self.name,
                LEASE_NAMESPACE,
                {"spec": body["spec"]},
                _content_type=MERGE_PATCH,
                **TIMEOUT,
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            node = self.kube.raw(
                self.kube.core.read_node(self.name, _preload_content=False, **TIMEOUT)
            )
            # Owned by the Node, as a kubelet's: deleting the node collects the lease.
            body["metadata"]["ownerReferences"] = [
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "name": self.name,
                    "uid": node["metadata"]["uid"],
                }
            ]
            self.kube.post(
                f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases", body
            )

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        ticks = 0
        while not self._stop.wait(RENEW_SECONDS):
            ticks += 1
            try:
                self.renew_lease()
                if ticks * RENEW_SECONDS % STATUS_SECONDS == 0:
                    self.post_status()
            except Exception as exc:  # the API server may be restarting; try next tick
                log.warning("heartbeat failed: %s", exc)

    def cordon(self) -> None:
        self.kube.core.patch_node(
            self.name, {"spec": {"unschedulable": True}}, _content_type=MERGE_PATCH, **TIMEOUT
        )

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=RENEW_SECONDS + 5)

    def deregister(self) -> None:
        """Delete the Node and its Lease (pods are gone by now)."""
        for delete in (
            lambda: self.kube.coordination.delete_namespaced_lease(
                self.name, LEASE_NAMESPACE, **TIMEOUT
            ),
            lambda: self.kube.core.delete_node(self.name, **TIMEOUT),
        ):
            try:
                delete()
            except ApiException as exc:
                if exc.status != 404:
                    raise

"""The operator, side by side with its anchors in one run.

    make bench            # or: .venv/bin/python bench/bench_operator.py [--full]

1. Burst-to-scale: from the commit of an enqueue to the worker Deployment's spec.replicas
   leaving 0, on flows idle at zero replicas (one flow per burst, all on one database,
   30 s poll). flowfleet's NOTIFY fast path beside the KEDA way: the same operator with
   NOTIFY off, polling every 30 s. Target: median < 1 s.
2. Depth read: 1,000 flows holding 1,000,000 pending records on one database; the
   operator's one statement per tick beside one query per flow (KEDA: a query per
   trigger). Target: < 250 ms per tick.
3. API writes per idle tick, and the operator's RSS, with 200 DistributedFlows.
   Targets: 0 writes, < 200 MB.

Needs the control plane binaries (hack/controlplane/cluster.sh build) and PostgreSQL.
--quick (default): 20 NOTIFY bursts, 4 polled ones; --full: 20 of each.
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
from flowfleet import queue  # noqa: E402
from flowfleet.throwaway import ThrowawayPostgres, free_port  # noqa: E402
from flowfleet_operator.queuedb import Database  # noqa: E402
from flowfleet_operator.scaling import Depth, Policy, decide  # noqa: E402

GROUP, VERSION, PLURAL = "flowfleet.io", "v1alpha1", "distributedflows"
CLUSTER_SH = REPO / "hack" / "controlplane" / "cluster.sh"
POLL_S = 30


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


@contextmanager
def control_plane() -> Iterator[tuple[Path, Any]]:
    from kubernetes import config

    state = Path(tempfile.mkdtemp(prefix="flowfleet-bench-cluster-"))
    env = {**os.environ, "FLOWFLEET_CLUSTER_DIR": str(state)}
    subprocess.run(["bash", str(CLUSTER_SH), "up"], env=env, check=True, capture_output=True)
    kubectl = subprocess.run(
        ["bash", str(CLUSTER_SH), "kubectl-path"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    kubeconfig = state / "kubeconfig"
    try:
        subprocess.run(
            [
                kubectl,
                f"--kubeconfig={kubeconfig}",
                "apply",
                "-f",
                str(REPO / "crds" / "distributedflow.yaml"),
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                kubectl,
                f"--kubeconfig={kubeconfig}",
                "wait",
                "--for=condition=Established",
                f"crd/{PLURAL}.{GROUP}",
                "--timeout=60s",
            ],
            check=True,
            capture_output=True,
        )
        api = config.new_client_from_config(config_file=str(kubeconfig))
        yield kubeconfig, api
        api.close()
    finally:
        subprocess.run(["bash", str(CLUSTER_SH), "down"], env=env, capture_output=True)


class Operator:
    def __init__(self, kubeconfig: Path, listen: bool) -> None:
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(
            prefix="flowfleet-bench-operator-", suffix=".log", delete=False
        )
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "FLOWFLEET_OPERATOR_HTTP_PORT": str(self.port),
            "FLOWFLEET_OPERATOR_LISTEN": "true" if listen else "false",
            "FLOWFLEET_OPERATOR_LOG_LEVEL": "WARNING",
        }
        flowfleet = Path(sys.executable).with_name("flowfleet")
        self.proc = subprocess.Popen(
            [str(flowfleet), "operator"], env=env, stdout=self.log, stderr=self.log
        )
        deadline = time.monotonic() + 60
        while not self._get("/healthz"):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("operator did not start")
            time.sleep(0.2)

    def _get(self, path: str) -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return str(r.read().decode())
        except OSError:
            return ""

    def metric(self, name: str) -> float:
        total = 0.0
        for line in self._get("/metrics").splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        Path(self.log.name).unlink()


def make_namespace(api: Any, name: str, dsn: str) -> None:
    from kubernetes import client

    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name}})
    core.create_namespaced_secret(
        name,
        {
            "metadata": {"name": "queue-db"},
            "data": {"connection-string": base64.b64encode(dsn.encode()).decode()},
        },
    )


def create_flows(api: Any, namespace: str, count: int, **spec: Any) -> list[str]:
    from kubernetes import client

    objs = client.CustomObjectsApi(api)
    names = [f"flow-{i:03d}" for i in range(count)]
    for name in names:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "DistributedFlow",
            "metadata": {"name": name},
            "spec": {
                "flowName": name,
                "image": "flowfleet:dev",
                "entrypoint": "flowfleet.examples:survey_processor",
                "runner": "plain",
                "database": {"secretRef": {"name": "queue-db"}},
                **spec,
            },
        }
        objs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    return names


def wait_ready(api: Any, namespace: str, names: list[str], timeout: float = 60) -> None:
    from kubernetes import client

    objs = client.CustomObjectsApi(api)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = objs.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
        ready = {
            i["metadata"]["name"]
            for i in items
            for c in (i.get("status") or {}).get("conditions", [])
            if c["type"] == "Active" and c["status"] == "False"
        }
        if ready >= set(names):
            return
        time.sleep(0.5)
    raise RuntimeError(f"flows not ready in {namespace}")


class ReplicaWatch:
    """When each Deployment's spec.replicas first left 0, from a watch (no polling)."""

    def __init__(self, api: Any, namespace: str) -> None:
        from kubernetes import client, watch

        self.first_up: dict[str, float] = {}
        self._watch = watch.Watch()
        apps = client.AppsV1Api(api)

        def run() -> None:
            try:
                self._stream(apps, namespace)
            except Exception:  # the stream ends when stop() closes it
                return

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def _stream(self, apps: Any, namespace: str) -> None:
        for event in self._watch.stream(apps.list_namespaced_deployment, namespace):
            d = (event or {}).get("object")
            if d is not None and (d.spec.replicas or 0) > 0:
                self.first_up.setdefault(d.metadata.name, time.perf_counter())

    def stop(self) -> None:
        self._watch.stop()


def bursts(
    api: Any, kubeconfig: Path, pg_dsn: str, namespace: str, listen: bool, count: int
) -> list[float]:
    make_namespace(api, namespace, pg_dsn)
    op = Operator(kubeconfig, listen=listen)
    try:
        names = create_flows(api, namespace, count, pollIntervalSeconds=POLL_S, maxReplicas=20)
        try:
            wait_ready(api, namespace, names)
        except RuntimeError:
            print(Path(op.log.name).read_text()[-4000:], file=sys.stderr)
            raise
        watcher = ReplicaWatch(api, namespace)
        time.sleep(1)
        committed: dict[str, float] = {}
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            for name in names:
                # Bursts land at independent random phases of the poll, as real work does.
                time.sleep(random.uniform(0.2, 1.0) if listen else random.uniform(0, POLL_S))
                queue.enqueue(conn, name, [{"n": i} for i in range(250)])
                committed[name] = time.perf_counter()
        deadline = time.perf_counter() + POLL_S * 2
        while len(watcher.first_up) < len(names) and time.perf_counter() < deadline:
            time.sleep(0.05)
        latencies = [watcher.first_up.get(n, float("inf")) - committed[n] for n in names]
        watcher.stop()
        return latencies
    finally:
        op.stop()


def idle_writes_and_rss(
    api: Any, kubeconfig: Path, pg_dsn: str, flows: int
) -> tuple[float, float, int]:
    make_namespace(api, "bench-idle", pg_dsn)
    op = Operator(kubeconfig, listen=True)
    try:
        names = create_flows(api, "bench-idle", flows, pollIntervalSeconds=2)
        wait_ready(api, "bench-idle", names)
        time.sleep(6)  # settle: last status writes of start-up
        ticks_before = op.metric("flowfleet_operator_tick_seconds_count")
        writes_before = op.metric("flowfleet_operator_api_writes_total")
        time.sleep(10)
        ticks = int(op.metric("flowfleet_operator_tick_seconds_count") - ticks_before)
        writes = op.metric("flowfleet_operator_api_writes_total") - writes_before
        return writes / max(ticks, 1), op.rss_mb(), ticks
    finally:
        op.stop()


def depth_read(
    pg: ThrowawayPostgres, flows: int, records: int, repeats: int
) -> tuple[float, float]:
    dsn = common.create_database(pg, "bench_depth", flowfleet_schema=True)
    names = [f"flow-{i:04d}" for i in range(flows)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO processing_queue (flow_name, payload)"
            " SELECT 'flow-' || lpad((i %% %s)::text, 4, '0'), '{}'::jsonb"
            " FROM generate_series(1, %s) AS i",
            [flows, records],
        )
        conn.execute("VACUUM ANALYZE processing_queue")
    db = Database(dsn)
    policy = Policy(0, 10, 100, 60)
    one_statement = []
    for _ in range(repeats):
        started = time.perf_counter()
        depths = db.depth(names)
        for name in names:
            d = depths[name]
            decide(policy, Depth(ready=d.ready, processing=d.processing), 0, (), 0.0)
        one_statement.append(time.perf_counter() - started)
    assert sum(d.pending for d in depths.values()) == records
    # The anchor: what a KEDA PostgreSQL trigger per flow runs, each on its own, through
    # the claim index (the fairest such query; counting processing too would scan more).
    per_flow = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(repeats):
            started = time.perf_counter()
            for name in names:
                conn.execute(
                    "SELECT count(*) FROM processing_queue"
                    " WHERE flow_name = %s AND status = 'pending'",
                    [name],
                ).fetchone()
            per_flow.append(time.perf_counter() - started)
    db.close()
    return common.median(one_statement), common.median(per_flow)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="20 polled bursts, more repeats")
    parser.add_argument("--quick", action="store_true", help="the default")
    args = parser.parse_args()
    polled = 20 if args.full else 4
    repeats = 9 if args.full else 5
    print("bench_operator: flowfleet operator against its anchors (2 cores, loopback)")
    pg = ThrowawayPostgres(durable=True).start()
    try:
        flowfleet_ms, per_flow_ms = (x * 1000 for x in depth_read(pg, 1000, 1_000_000, repeats))
        print("\nDepth read, 1,000 flows, 1,000,000 pending, one database (median):")
        common.row(
            "one statement per tick + 1,000 decisions", f"{flowfleet_ms:.0f} ms", "target < 250 ms"
        )
        common.row(
            "anchor: one query per flow (a trigger each)",
            f"{per_flow_ms:.0f} ms",
            f"ratio {per_flow_ms / flowfleet_ms:.1f}x",
        )
        with control_plane() as (kubeconfig, api):
            dsn = common.create_database(pg, "bench_notify", flowfleet_schema=True)
            fast = bursts(api, kubeconfig, dsn, "bench-notify", listen=True, count=20)
            print(
                f"  (NOTIFY bursts done: median {statistics.median(fast) * 1000:.0f} ms)",
                flush=True,
            )
            dsn = common.create_database(pg, "bench_poll", flowfleet_schema=True)
            slow = bursts(api, kubeconfig, dsn, "bench-poll", listen=False, count=polled)
            dsn = common.create_database(pg, "bench_idle", flowfleet_schema=True)
            print("\nBurst-to-scale, enqueue commit -> Deployment spec.replicas 0 -> n:")
            common.row(
                f"NOTIFY fast path, {len(fast)} bursts",
                f"{statistics.median(fast) * 1000:.0f} ms",
                f"p95 {p95(fast) * 1000:.0f} ms; target median < 1 s",
            )
            common.row(
                f"anchor: 30 s poll, NOTIFY off (KEDA), {len(slow)} bursts",
                f"{statistics.median(slow) * 1000:.0f} ms",
                f"p95 {p95(slow) * 1000:.0f} ms; ratio "
                f"{statistics.median(slow) / statistics.median(fast):.0f}x",
            )
            per_tick, rss, ticks = idle_writes_and_rss(api, kubeconfig, dsn, 200)
            print("\n200 DistributedFlows, idle:")
            common.row(f"API writes per idle tick ({ticks} ticks)", f"{per_tick:.2f}", "target 0")
            common.row("operator RSS", f"{rss:.0f} MB", "target < 200 MB")
    finally:
        pg.stop()


if __name__ == "__main__":
    main()

"""The whole loop on one machine, for `make demo-k8s` and the loop benchmark.

Brings up the control plane (hack/controlplane), a local node that runs pods as
processes (hack/localnode), a throwaway PostgreSQL with a migrated queue, a namespace
with the DSN in a Secret; then a burst of records, a live table while the fleet
scales up, drains and scales back to zero, one pod force-deleted mid-run, and a
summary (time to first pod Ready, to first record done, peak replicas, drain time, the
killed pod's records and how long until they were pending again, duplicate
executions, time back to zero).

Who scales: by default the real operator, INSTALLED BY THE HELM CHART (charts/flowfleet,
helm from hack/helm/helm.sh): its Deployment runs on the local node as a real pod
(`flowfleet operator` under the chart's ServiceAccount; the chart's ``httpPort`` is set to a
free local port, since every pod here shares the machine's network). Then the demo's
DistributedFlow (``distributed_flow()``, the seed's survey processor) is applied.

With ``--operator-cmd`` the operator runs as that command instead (with KUBECONFIG,
DEMO_NAMESPACE, DEMO_DSN and DEMO_SECRET in its environment, in the background if it keeps
running, e.g. ``flowfleet operator``), and ``--flow-manifest`` (a DistributedFlow;
``${DEMO_NAMESPACE}`` and ``${DEMO_SECRET}`` in it are replaced) is applied, or without
one the demo's own. ``--stand-in`` replaces the operator with a crude scaler in this script
(replicas = depth / per-replica, capped, to zero after a delay), to show the node, the
workers and the queue alone.

    .venv/bin/python hack/demo_k8s.py                          # the chart's operator pod
    .venv/bin/python hack/demo_k8s.py --records 2000 --keep    # leave it all running
    .venv/bin/python hack/demo_k8s.py --operator-cmd ".venv/bin/flowfleet operator"
    .venv/bin/python hack/demo_k8s.py --stand-in               # no operator at all
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from kubernetes import client, config, utils

from flowfleet import queue
from flowfleet.migrate import migrate
from flowfleet.throwaway import ThrowawayPostgres, free_port

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SH = REPO / "hack" / "controlplane" / "cluster.sh"
NODE_SH = REPO / "hack" / "localnode" / "node.sh"
FLOW = "survey_processor"
SECRET = "queue-db"  # noqa: S105 - the Secret's name, not a secret
STAND_IN_SELECTOR = f"flowfleet.io/flow={FLOW}"
# The operator's worker pods (operator/flowfleet_operator/manifests.py labels).
OPERATOR_SELECTOR = "app.kubernetes.io/instance=survey-processor,app.kubernetes.io/component=worker"
HELM_SH = REPO / "hack" / "helm" / "helm.sh"
CHART = REPO / "charts" / "flowfleet"
OPERATOR_NAMESPACE = "flowfleet-system"
ROW = "{:>6} {:>5} {:>4} {:>8} {:>10} {:>9} {:>8}"
EFFECTS_DDL = "CREATE TABLE IF NOT EXISTS demo_effects (record_key text NOT NULL)"


def say(message: str) -> None:
    print(f"demo-k8s: {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], env: dict[str, str], timeout: float = 3600) -> str:
    done = subprocess.run(
        cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"demo-k8s: {' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


# ------------------------------------------------------------------ stack ----


@dataclass
class Stack:
    """Everything the loop runs on; ``stack()`` starts and removes it."""

    state_dir: Path
    kubeconfig: Path
    api: client.ApiClient
    namespace: str
    dsn: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def apps(self) -> client.AppsV1Api:
        return client.AppsV1Api(self.api)


@contextmanager
def stack(state_dir: Path, keep: bool, namespace: str = "flowfleet-demo") -> Iterator[Stack]:
    cluster_env = {"FLOWFLEET_CLUSTER_DIR": str(state_dir / "cluster")}
    node_env = {**cluster_env, "FLOWFLEET_NODE_DIR": str(state_dir / "node")}
    started = time.monotonic()
    say("control plane (a cold build takes minutes; cached: seconds)")
    run(["bash", str(CLUSTER_SH), "up"], cluster_env)
    kubeconfig = state_dir / "cluster" / "kubeconfig"
    node_env["KUBECONFIG"] = str(kubeconfig)
    pg = ThrowawayPostgres()
    try:
        say("local node")
        run(["bash", str(NODE_SH), "start"], node_env, timeout=120)
        say("PostgreSQL")
        pg.start()
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE demo")
        dsn = pg.dsn("demo")
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn)
            conn.execute(EFFECTS_DDL)
        api = config.new_client_from_config(config_file=str(kubeconfig))
        core = client.CoreV1Api(api)
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
        _wait(lambda: core.read_namespaced_service_account("default", namespace), 60)
        secret = client.V1Secret(
            metadata=client.V1ObjectMeta(name=SECRET), string_data={"dsn": dsn}
        )
        core.create_namespaced_secret(namespace, secret)
        say(f"up in {time.monotonic() - started:.1f}s (state in {state_dir})")
        env = {
            **cluster_env,
            "KUBECONFIG": str(kubeconfig),
            "DEMO_NAMESPACE": namespace,
            "DEMO_DSN": dsn,
            "DEMO_SECRET": SECRET,
        }
        yield Stack(state_dir, kubeconfig, api, namespace, dsn, env)
    finally:
        if keep:
            say(f"--keep: left running; export KUBECONFIG={kubeconfig}; PostgreSQL at {pg.dsn()}")
        else:
            say("tearing down")
            subprocess.run(
                ["bash", str(NODE_SH), "stop"], env={**os.environ, **node_env}, check=False
            )
            subprocess.run(
                ["bash", str(CLUSTER_SH), "down"], env={**os.environ, **cluster_env}, check=False
            )
            pg.stop()


def _wait(predicate: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise TimeoutError("timed out")
        time.sleep(0.2)


# ------------------------------------------------------------- who scales ----


def stand_in_deployment(work_seconds: float) -> dict[str, Any]:
    """A worker Deployment like the operator's: pod name as instance id, DSN from the
    Secret, probes on the worker's port, a short lease so a killed pod's claims come
    back quickly without the operator's release."""
    labels = {"app.kubernetes.io/name": "flowfleet", "flowfleet.io/flow": FLOW}
    container = {
        "name": "worker",
        "image": "flowfleet:dev",
        "args": [
            "worker",
            FLOW,
            "--entrypoint",
            "demo_processors:survey_with_effect",
            "--runner",
            "plain",
            "--lease-seconds",
            "6",
            "--poll-seconds",
            "0.5",
        ],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {
                "name": "FLOWFLEET_DSN",
                "valueFrom": {"secretKeyRef": {"name": SECRET, "key": "dsn"}},
            },
            # Pods are local processes here, so the demo's processor comes from hack/.
            {"name": "PYTHONPATH", "value": str(REPO / "hack")},
            {"name": "DEMO_WORK_SECONDS", "value": str(work_seconds)},
        ],
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 1},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "survey-processor", "labels": labels},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": 30,
                    "automountServiceAccountToken": False,
                    "containers": [container],
                },
            },
        },
    }


class StandInScaler(threading.Thread):
    """The operator's decision, crudely: replicas = ceil(live records / per replica),
    capped, and zero once the queue has been empty for ``delay`` seconds."""

    def __init__(self, st: Stack, per_replica: int, max_replicas: int, delay: float) -> None:
        super().__init__(name="stand-in-scaler", daemon=True)
        self.st, self.per_replica, self.max_replicas, self.delay = (
            st,
            per_replica,
            max_replicas,
            delay,
        )
        self.stopping = threading.Event()

    def run(self) -> None:
        empty_since: float | None = None
        with psycopg.connect(self.st.dsn, autocommit=True) as conn:
            while not self.stopping.wait(1.0):
                counts = queue.stats(conn, FLOW, completed=False).get(FLOW, {})
                live = counts.get("pending_records", 0) + counts.get("processing_records", 0)
                if live:
                    empty_since = None
                    want = min(self.max_replicas, math.ceil(live / self.per_replica))
                else:
                    empty_since = empty_since or time.monotonic()
                    want = -1 if time.monotonic() - empty_since < self.delay else 0
                if want >= 0:
                    scale = self.st.apps.read_namespaced_deployment_scale(
                        "survey-processor", self.st.namespace
                    )
                    current = (scale.spec.replicas if scale.spec else 0) or 0
                    # Like the operator: never scale in while records are live.
                    if want > current or (want == 0 and not live):
                        self.st.apps.patch_namespaced_deployment_scale(
                            "survey-processor", self.st.namespace, {"spec": {"replicas": want}}
                        )

    def stop(self) -> None:
        self.stopping.set()


def distributed_flow(args: argparse.Namespace) -> dict[str, Any]:
    """The demo's DistributedFlow (crds/distributedflow.yaml): the stand-in's worker and
    sizing, for the operator to run."""
    return {
        "apiVersion": "flowfleet.io/v1alpha1",
        "kind": "DistributedFlow",
        "metadata": {"name": "survey-processor"},
        "spec": {
            "flowName": FLOW,
            "image": "flowfleet:dev",
            "entrypoint": "demo_processors:survey_with_effect",
            "runner": "plain",
            "database": {"secretRef": {"name": SECRET, "key": "dsn"}},
            "minReplicas": 0,
            "maxReplicas": args.max_replicas,
            "recordsPerReplica": args.per_replica,
            "scaleDownDelaySeconds": int(args.scale_down_delay),
            "pollIntervalSeconds": 1,
            "leaseSeconds": 6,
            "env": [
                # Pods are local processes here, so the demo's processor comes from hack/.
                {"name": "PYTHONPATH", "value": str(REPO / "hack")},
                {"name": "DEMO_WORK_SECONDS", "value": str(args.work_seconds)},
            ],
        },
    }


def apply_flow(st: Stack, args: argparse.Namespace) -> None:
    kubectl = ["bash", str(CLUSTER_SH), "kubectl", "-n", st.namespace]
    if args.flow_manifest:
        text = Path(args.flow_manifest).read_text()
        for key in ("DEMO_NAMESPACE", "DEMO_SECRET"):
            text = text.replace("${" + key + "}", st.env[key])
    else:
        text = json.dumps(distributed_flow(args))
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as manifest:
        manifest.write(text)
    run([*kubectl, "apply", "-f", manifest.name], st.env)


def install_chart(st: Stack) -> None:
    """`helm install` the chart; the local node runs its operator pod. ``--wait``: until
    that pod is Ready (its /healthz on the mapped port)."""
    started = time.monotonic()
    say("operator: helm install charts/flowfleet (its pod runs on the local node)")
    helm = ["bash", str(HELM_SH), "--kubeconfig", str(st.kubeconfig)]
    release = ["install", "flowfleet", str(CHART), "-n", OPERATOR_NAMESPACE, "--create-namespace"]
    values = ["--set", f"httpPort={free_port()}", "--set", "logFormat=text"]
    run([*helm, *release, *values, "--wait", "--timeout", "180s"], st.env, timeout=240)
    pods: Any = st.core.list_namespaced_pod(OPERATOR_NAMESPACE).items
    names = ", ".join(f"{p.metadata.name} on {p.spec.node_name}" for p in pods)
    say(f"operator pod Ready in {time.monotonic() - started:.1f}s: {names}")


@contextmanager
def scaler(st: Stack, args: argparse.Namespace) -> Iterator[str]:
    """Starts whoever scales; yields the label selector of the worker pods."""
    if args.stand_in:
        utils.create_from_dict(
            st.api, stand_in_deployment(args.work_seconds), namespace=st.namespace
        )
        stand_in = StandInScaler(st, args.per_replica, args.max_replicas, args.scale_down_delay)
        stand_in.start()
        try:
            yield STAND_IN_SELECTOR
        finally:
            stand_in.stop()
        return
    if not args.operator_cmd:
        install_chart(st)
        apply_flow(st, args)
        yield args.pod_selector or OPERATOR_SELECTOR
        return
    log = (st.state_dir / "operator.log").open("ab")
    operator = subprocess.Popen(
        shlex.split(args.operator_cmd),
        env={**os.environ, **st.env},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        kubectl = ["bash", str(CLUSTER_SH), "kubectl", "-n", st.namespace]
        # The CRD, unless the command installed it already (helm does): apply is idempotent.
        run([*kubectl, "apply", "-f", str(REPO / "crds" / "distributedflow.yaml")], st.env)
        apply_flow(st, args)
        yield args.pod_selector or OPERATOR_SELECTOR
    finally:
        if operator.poll() is None:
            operator.terminate()
            try:
                operator.wait(30)
            except subprocess.TimeoutExpired:
                operator.kill()
        log.close()


# ------------------------------------------------------------------ burst ----


@dataclass
class Summary:
    records: int
    first_scale_up_s: float | None = None
    first_pod_ready_s: float | None = None
    first_record_done_s: float | None = None
    peak_replicas: int = 0
    drain_s: float | None = None
    back_to_zero_s: float | None = None
    killed_pod: str | None = None
    killed_pod_records: int = 0
    killed_records_released_s: float | None = None
    duplicates: int | None = None
    completed: int = 0
    failed: int = 0


def ready_pods(st: Stack, selector: str) -> tuple[list[str], int]:
    """Names of the Ready, not terminating worker pods; and how many pods exist at all."""
    answer: Any = st.core.list_namespaced_pod(
        st.namespace, label_selector=selector, _preload_content=False
    )
    pods = json.loads(answer.data)["items"]
    ready = [
        str(p["metadata"]["name"])
        for p in pods
        if not p["metadata"].get("deletionTimestamp")
        and any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in (p.get("status") or {}).get("conditions") or []
        )
    ]
    return sorted(ready), len(pods)


def scaled_up(st: Stack) -> bool:
    """The worker Deployment asks for pods (whoever scales it)."""
    try:
        scale = st.apps.read_namespaced_deployment_scale("survey-processor", st.namespace)
    except client.ApiException:
        return False  # not created yet
    return bool(scale.spec and scale.spec.replicas)


def burst(st: Stack, selector: str, args: argparse.Namespace) -> Summary:
    summary = Summary(records=args.records)
    conn = psycopg.connect(st.dsn, autocommit=True)
    queue.enqueue(conn, FLOW, [{"n": n, "survey_id": n} for n in range(args.records)])
    t0 = time.monotonic()
    say(f"enqueued {args.records} records")
    print(ROW.format("t", "ready", "pods", "pending", "processing", "completed", "rate/s"))
    last_completed, last_t, next_print = 0, t0, t0
    killed_ids: set[int] = set()
    kill_t = 0.0
    try:
        while time.monotonic() - t0 < args.timeout:
            now = time.monotonic()
            ready, pods = ready_pods(st, selector)
            counts = queue.stats(conn, FLOW).get(FLOW, {})
            pending, processing = (
                counts.get("pending_records", 0),
                counts.get("processing_records", 0),
            )
            completed = counts.get("completed_records", 0)
            summary.peak_replicas = max(summary.peak_replicas, len(ready))
            if summary.first_scale_up_s is None and scaled_up(st):
                summary.first_scale_up_s = now - t0
            if ready and summary.first_pod_ready_s is None:
                summary.first_pod_ready_s = now - t0
            if completed and summary.first_record_done_s is None:
                summary.first_record_done_s = now - t0
            if (
                summary.killed_pod is None
                and len(ready) >= 2
                and completed >= args.kill_at * args.records
                and pending + processing
            ):
                victim = ready[0]
                killed_ids = {
                    row[0]
                    for row in conn.execute(
                        "SELECT id FROM processing_queue"
                        " WHERE flow_instance_id = %s AND status = 'processing'",
                        (victim,),
                    )
                }
                st.core.delete_namespaced_pod(victim, st.namespace, grace_period_seconds=0)
                kill_t = now
                summary.killed_pod, summary.killed_pod_records = victim, len(killed_ids)
                say(f"force-deleted {victim} holding {len(killed_ids)} records")
            if killed_ids and summary.killed_records_released_s is None:
                still = conn.execute(
                    "SELECT count(*) FROM processing_queue"
                    " WHERE id = ANY(%s) AND flow_instance_id = %s",
                    (list(killed_ids), summary.killed_pod),
                ).fetchone()
                if still == (0,):
                    summary.killed_records_released_s = now - kill_t
            if not pending and not processing and summary.drain_s is None:
                summary.drain_s = now - t0
            if summary.drain_s is not None and pods == 0:
                summary.back_to_zero_s = now - t0
            if now >= next_print or summary.back_to_zero_s is not None:
                rate = (completed - last_completed) / max(now - last_t, 1e-6)
                cells = (f"{now - t0:.1f}", len(ready), pods, pending, processing, completed)
                print(ROW.format(*cells, f"{rate:.0f}"), flush=True)
                last_completed, last_t, next_print = completed, now, now + args.print_every
            if summary.back_to_zero_s is not None:
                break
            time.sleep(0.2)
        final = queue.stats(conn, FLOW).get(FLOW, {})
        summary.completed = final.get("completed_records", 0)
        summary.failed = final.get("failed_records", 0)
        rows, distinct = conn.execute(
            "SELECT count(*), count(DISTINCT record_key) FROM demo_effects"
        ).fetchone() or (0, 0)
        summary.duplicates = rows - distinct if rows else None
    finally:
        conn.close()
    return summary


def report(summary: Summary) -> None:
    def secs(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}s"

    def line(label: str, value: object) -> None:
        print(f"{label:<30}{value}")

    print()
    line("records", f"{summary.records} (completed {summary.completed}, failed {summary.failed})")
    line("first scale-up", secs(summary.first_scale_up_s))
    line("first pod Ready", secs(summary.first_pod_ready_s))
    line("first record done", secs(summary.first_record_done_s))
    line("peak replicas (Ready)", summary.peak_replicas)
    line("drained", secs(summary.drain_s))
    if summary.killed_pod:
        held = f"{summary.killed_pod_records} records"
        after = secs(summary.killed_records_released_s)
        line("force-deleted pod", f"{summary.killed_pod}: {held}, none held after {after}")
    if summary.duplicates is None:
        line("duplicate executions", "n/a (the processor writes no demo_effects)")
    else:
        line("duplicate executions", summary.duplicates)
    line("back to zero pods", secs(summary.back_to_zero_s))


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="demo_k8s", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument(
        "--work-seconds", type=float, default=0.002, help="per record (stand-in workers)"
    )
    parser.add_argument("--per-replica", type=int, default=2_500, help="recordsPerReplica")
    parser.add_argument("--max-replicas", type=int, default=4, help="maxReplicas")
    parser.add_argument("--scale-down-delay", type=float, default=5.0, help="scaleDownDelaySeconds")
    parser.add_argument(
        "--kill-at", type=float, default=0.3, help="force-delete a pod once this share is done"
    )
    parser.add_argument("--timeout", type=float, default=150.0)
    parser.add_argument("--print-every", type=float, default=1.0)
    parser.add_argument(
        "--operator-cmd", help="run the operator as this command instead of the chart's pod"
    )
    parser.add_argument(
        "--stand-in", action="store_true", help="no operator: a crude scaler in this script"
    )
    parser.add_argument(
        "--flow-manifest", help="DistributedFlow to apply after the operator starts"
    )
    parser.add_argument("--pod-selector", help="label selector of the worker pods")
    parser.add_argument("--state-dir", type=Path, default=REPO / ".demo-k8s")
    parser.add_argument(
        "--keep", action="store_true", help="leave cluster, node and PostgreSQL running"
    )
    parser.add_argument("--json", type=Path, help="also write the summary here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    args.state_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with stack(args.state_dir.resolve(), args.keep) as st, scaler(st, args) as selector:
        summary = burst(st, selector, args)
    report(summary)
    print(f"{'whole demo':<30}{time.monotonic() - started:.1f}s")
    if args.json:
        args.json.write_text(json.dumps(asdict(summary), indent=2) + "\n")
    ok = (
        summary.back_to_zero_s is not None
        and summary.completed == summary.records
        and not summary.duplicates
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Burst to first record processed through the whole loop on one machine, side by side
with its anchor.

Loop: records arrive in an empty queue with the worker Deployment at zero replicas;
the scaler raises it, the scheduler binds the pod, the local node starts the worker
process, the worker claims and completes the first record. Timed per phase: enqueue ->
replicas > 0 (the scaler's decision), -> pod Running (process started), -> first record
done. Anchor: the same worker command started as a plain local process at the moment
of the enqueue, no Kubernetes: the least a scale-from-zero can cost here. The ratio
is the price of the loop.

Who scales: by default the real operator, installed by the Helm chart as a pod on the
local node (as ``make demo-k8s`` does; pollIntervalSeconds 1, so LISTEN/NOTIFY wakes it
on the enqueue); or the operator as a command (``--operator-cmd``, ``--flow-manifest``,
``--pod-selector``), or the demo's stand-in scaler (``--stand-in``, polls each second).
See hack/demo_k8s.py; the phases are the same.

    .venv/bin/python bench/bench_loop.py            # 3 bursts
    .venv/bin/python bench/bench_loop.py --full     # 10 bursts, the figure for the README
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from flowfleet import queue

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "hack"))
sys.path.insert(0, str(REPO / "bench"))

import demo_k8s  # noqa: E402 - hack/ is not a package

from common import median, row  # noqa: E402

FLOW = demo_k8s.FLOW
ANCHOR_FLOW = "anchor_flow"  # a flow no scaler watches: the anchor runs alone
POLL_S = 0.05


def wait(predicate: Any, timeout: float, what: str) -> float:
    """Seconds until predicate() is true, polling every POLL_S."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"bench_loop: timed out waiting for {what}")
        time.sleep(POLL_S)
    return time.monotonic()


def completed(conn: psycopg.Connection, flow: str = FLOW) -> int:
    one = conn.execute(
        "SELECT count(*) FROM processing_history WHERE flow_name = %s", (flow,)
    ).fetchone()
    return int(one[0]) if one else 0


def replicas(st: demo_k8s.Stack, selector: str) -> int:
    deployments = st.apps.list_namespaced_deployment(st.namespace, label_selector=selector).items
    return sum((d.spec.replicas or 0) if d.spec else 0 for d in deployments)


def running_pods(st: demo_k8s.Stack, selector: str) -> int:
    answer: Any = st.core.list_namespaced_pod(
        st.namespace, label_selector=selector, _preload_content=False
    )
    pods = json.loads(answer.data)["items"]
    return sum(1 for p in pods if (p.get("status") or {}).get("phase") == "Running")


def loop_burst(st: demo_k8s.Stack, selector: str, records: int) -> dict[str, float]:
    with psycopg.connect(st.dsn, autocommit=True) as conn:
        wait(lambda: running_pods(st, selector) == 0, 120, "zero pods before the burst")
        done_before = completed(conn)
        queue.enqueue(conn, FLOW, [{"n": n, "survey_id": n} for n in range(records)])
        t0 = time.monotonic()
        scaled = wait(lambda: replicas(st, selector) > 0, 60, "scale-up")
        running = wait(lambda: running_pods(st, selector) > 0, 60, "a Running pod")
        first = wait(lambda: completed(conn) > done_before, 60, "the first record")
        wait(lambda: completed(conn) >= done_before + records, 120, "the burst drained")
    return {
        "to_scale_s": scaled - t0,
        "to_running_s": running - t0,
        "to_first_record_s": first - t0,
    }


def direct_burst(st: demo_k8s.Stack, records: int) -> float:
    """The anchor: the worker as a local process started at enqueue time."""
    deployment = demo_k8s.stand_in_deployment(0.002)
    args = list(deployment["spec"]["template"]["spec"]["containers"][0]["args"])
    args[args.index(FLOW)] = ANCHOR_FLOW
    env = {
        **os.environ,
        "FLOWFLEET_DSN": st.dsn,
        "PYTHONPATH": str(REPO / "hack"),
        "POD_NAME": "direct",
    }
    flowfleet = str(Path(sys.executable).parent / "flowfleet")
    with psycopg.connect(st.dsn, autocommit=True) as conn:
        done_before = completed(conn, ANCHOR_FLOW)
        queue.enqueue(conn, ANCHOR_FLOW, [{"n": n, "survey_id": n} for n in range(records)])
        t0 = time.monotonic()
        worker = subprocess.Popen(
            [flowfleet, *args, "--http-port", "0", "--exit-when-empty"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            first = wait(
                lambda: completed(conn, ANCHOR_FLOW) > done_before, 60, "the first record (anchor)"
            )
            worker.wait(120)
        finally:
            if worker.poll() is None:
                worker.kill()
    return first - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="10 bursts instead of 3")
    parser.add_argument("--records", type=int, default=100, help="records per burst")
    parser.add_argument("--operator-cmd")
    parser.add_argument("--flow-manifest")
    parser.add_argument("--pod-selector")
    parser.add_argument("--stand-in", action="store_true", help="the demo's crude scaler")
    parser.add_argument("--state-dir", type=Path, default=REPO / ".bench-loop")
    args = parser.parse_args()
    bursts = 10 if args.full else 3
    demo_args = argparse.Namespace(
        operator_cmd=args.operator_cmd,
        stand_in=args.stand_in,
        flow_manifest=args.flow_manifest,
        pod_selector=args.pod_selector,
        work_seconds=0.002,
        per_replica=1000,
        max_replicas=1,
        scale_down_delay=1.0,
    )
    args.state_dir.mkdir(parents=True, exist_ok=True)
    loop: list[dict[str, float]] = []
    direct: list[float] = []
    with (
        demo_k8s.stack(args.state_dir.resolve(), keep=False) as st,
        demo_k8s.scaler(st, demo_args) as selector,
    ):
        for _ in range(bursts):
            loop.append(loop_burst(st, selector, args.records))
            direct.append(direct_burst(st, args.records))
    who = "stand-in scaler" if args.stand_in else args.operator_cmd or "the chart's operator pod"
    print(f"\nburst of {args.records} records into an empty queue, median of {bursts} ({who}):")
    for key, label in (
        ("to_scale_s", "enqueue -> replicas > 0 (scaler)"),
        ("to_running_s", "enqueue -> pod Running (process started)"),
        ("to_first_record_s", "enqueue -> first record done (whole loop)"),
    ):
        row(label, f"{median([b[key] for b in loop]):.2f} s")
    anchor = median(direct)
    row("anchor: worker started as a local process at enqueue", f"{anchor:.2f} s")
    loop_first = median([b["to_first_record_s"] for b in loop])
    row("loop / anchor", f"{loop_first / anchor:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

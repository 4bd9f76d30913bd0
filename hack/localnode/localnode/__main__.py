"""``python -m localnode --kubeconfig FILE [--name NAME] [--state-dir DIR]``: run a local
node until SIGTERM or SIGINT, then stop every process it started and leave."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from kubernetes import client, config

from localnode.agent import Agent, build_context
from localnode.container import Backoff
from localnode.kube import Kube
from localnode.logserver import LogServer
from localnode.node import NodeRegistration

REPO = Path(__file__).resolve().parents[3]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="localnode", description=__doc__)
    parser.add_argument(
        "--kubeconfig", default=os.environ.get("KUBECONFIG"), help="admin kubeconfig"
    )
    parser.add_argument("--name", default="localnode", help="node name (default: localnode)")
    parser.add_argument(
        "--state-dir", type=Path, help="pods' logs, pids, homes (default: <repo>/.localnode/<name>)"
    )
    parser.add_argument(
        "--flowfleet",
        default=str(Path(sys.prefix) / "bin" / "flowfleet"),
        help="the flowfleet executable pods run",
    )
    parser.add_argument(
        "--backoff-base",
        type=float,
        default=10.0,
        help="crash-loop back-off start, seconds (kubelet: 10)",
    )
    parser.add_argument(
        "--backoff-cap",
        type=float,
        default=300.0,
        help="crash-loop back-off cap, seconds (kubelet: 300)",
    )
    parser.add_argument(
        "--keep-node",
        action="store_true",
        help="on stop, leave the Node and its pods in the API (a kubelet restart)",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if not args.kubeconfig:
        parser.error("give --kubeconfig or set KUBECONFIG")
    if not Path(args.flowfleet).is_file():
        parser.error(f"no flowfleet executable at {args.flowfleet} (run make setup)")
    return args


def image_env(flowfleet: str) -> dict[str, str]:
    """What the flowfleet image's environment would give (Dockerfile ENV), plus a PATH
    that finds this checkout's executables first. Nothing else of ours leaks in."""
    bindir = str(Path(flowfleet).parent)
    return {
        "PATH": f"{bindir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    state_dir: Path = (args.state_dir or REPO / ".localnode" / args.name).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    api = config.new_client_from_config(config_file=args.kubeconfig)
    kube = Kube(api, args.name)
    version = client.VersionApi(api).get_code().git_version
    registration = NodeRegistration(kube, args.name, state_dir, version)
    logs = LogServer(state_dir)
    registration.kubelet_port = logs.start()  # kubectl logs, through the API server
    ca_file = state_dir / "ca.crt"
    if api.configuration.ssl_ca_cert:
        ca_file.write_bytes(Path(api.configuration.ssl_ca_cert).read_bytes())
    ctx = build_context(
        kube,
        registration,
        state_dir,
        flowfleet=str(Path(args.flowfleet).absolute()),
        python=str(Path(args.flowfleet).absolute().parent / "python"),
        backoff=Backoff(base=args.backoff_base, cap=args.backoff_cap),
        base_env=image_env(args.flowfleet),
        server=api.configuration.host,
        ca_file=str(ca_file) if ca_file.exists() else "",
    )
    agent = Agent(ctx, registration, keep_node=args.keep_node)

    def stop(signum: int, _frame: FrameType | None) -> None:
        logging.getLogger("localnode").info("signal %d: stopping", signum)
        agent.stop_requested.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    (state_dir / "agent.pid").write_text(f"{os.getpid()}\n")
    ready = state_dir / "ready"
    ready.unlink(missing_ok=True)

    def mark_ready() -> None:
        ready.write_text(f"{args.name}\n")

    agent.on_ready = mark_ready
    try:
        agent.run()
    finally:
        logs.stop()
        ready.unlink(missing_ok=True)
        (state_dir / "agent.pid").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

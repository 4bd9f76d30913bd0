#!/usr/bin/env bash
# A local node for the control plane of hack/controlplane: registers a Node and runs
# the pods bound to it as local flowfleet processes (see README.md here).
#
# Usage: node.sh start|stop|status|dir
#   start   start the agent in the background (pid file in the state dir); wait until
#           its Node is registered; report it if it already runs
#   stop    SIGTERM the agent: it stops every pod process (TERM, then KILL after the
#           pod's grace period), deletes its pods and its Node; SIGKILL after
#           FLOWFLEET_NODE_STOP_TIMEOUT, which kills its processes with it
#   status  exit 0 if the agent runs and is registered
#   dir     print the state dir (agent.log, pods/<ns>_<pod>_<uid>/<container>.log)
#
# Environment:
#   KUBECONFIG                   admin kubeconfig (default: cluster.sh's, i.e.
#                                $FLOWFLEET_CLUSTER_DIR/kubeconfig)
#   FLOWFLEET_NODE_NAME          node name (default localnode)
#   FLOWFLEET_NODE_DIR           state dir (default <repo>/.localnode/<name>)
#   FLOWFLEET_NODE_ARGS          extra agent options, e.g. "--backoff-base 0.5"
#   FLOWFLEET_NODE_STOP_TIMEOUT  seconds before SIGKILL on stop (default 90)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
NAME="${FLOWFLEET_NODE_NAME:-localnode}"
STATE="$(realpath -m "${FLOWFLEET_NODE_DIR:-$REPO/.localnode/$NAME}")"
PIDFILE="$STATE/node.pid"
PYTHON="$REPO/.venv/bin/python"

log() { echo "node.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

# The recorded pid is alive and is our agent (its command line names our state dir).
running() {
	[[ -f "$PIDFILE" ]] || return 1
	local pid cmdline
	pid="$(cat "$PIDFILE")"
	[[ "$pid" =~ ^[0-9]+$ ]] || return 1
	cmdline="$({ tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null)" || return 1
	[[ "$cmdline" == *localnode*"$STATE"* ]]
}

cmd_start() {
	mkdir -p "$STATE"
	if running && [[ -f "$STATE/ready" ]]; then
		log "already running (pid $(cat "$PIDFILE"))"
		return
	fi
	[[ -x "$PYTHON" ]] || die "no $PYTHON: run make setup"
	local kubeconfig="${KUBECONFIG:-}"
	if [[ -z "$kubeconfig" ]]; then
		kubeconfig="$("$REPO/hack/controlplane/cluster.sh" env | sed 's/^export KUBECONFIG=//')"
	fi
	[[ -f "$kubeconfig" ]] || die "no kubeconfig at $kubeconfig: is the cluster up (make cluster-up)?"
	rm -f "$STATE/ready"
	# Own session, stdin from /dev/null, output to a log: the caller's pipes neither
	# wait for it nor pass it their signals.
	# shellcheck disable=SC2086 # FLOWFLEET_NODE_ARGS is a list of options
	PYTHONPATH="$HERE" setsid "$PYTHON" -m localnode --kubeconfig "$kubeconfig" --name "$NAME" \
		--state-dir "$STATE" ${FLOWFLEET_NODE_ARGS:-} </dev/null >>"$STATE/agent.log" 2>&1 &
	local pid=$! i
	echo "$pid" >"$PIDFILE"
	for ((i = 0; i < 300; i++)); do
		[[ -f "$STATE/ready" ]] && break
		# kill -0, not running(): until setsid has exec'd, the child's command line is
		# still this script's.
		if ! kill -0 "$pid" 2>/dev/null; then
			tail -n 30 "$STATE/agent.log" >&2 || true
			die "the agent exited (log: $STATE/agent.log)"
		fi
		sleep 0.1
	done
	[[ -f "$STATE/ready" ]] || die "the agent did not register within 30 s (log: $STATE/agent.log)"
	log "node $NAME up (pid $(cat "$PIDFILE")); state in $STATE"
}

cmd_stop() {
	running || { rm -f "$PIDFILE"; log "not running"; return 0; }
	local pid i timeout="${FLOWFLEET_NODE_STOP_TIMEOUT:-90}"
	pid="$(cat "$PIDFILE")"
	kill -TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < timeout * 10; i++)); do
		running || break
		sleep 0.1
	done
	if running; then
		log "agent (pid $pid) still stopping after ${timeout}s; killing it and its processes"
		kill -KILL "$pid" 2>/dev/null || true
		for ((i = 0; i < 50; i++)); do running || break; sleep 0.1; done
	fi
	running && die "could not stop the agent (pid $pid)"
	rm -f "$PIDFILE"
	log "node $NAME stopped"
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) running && [[ -f "$STATE/ready" ]] ;;
dir) echo "$STATE" ;;
*)
	sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
	exit 2
	;;
esac

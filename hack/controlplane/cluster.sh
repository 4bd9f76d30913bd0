#!/usr/bin/env bash
# A real Kubernetes control plane for tests and the demo: etcd + kube-apiserver +
# kube-controller-manager + kube-scheduler built from Go modules (see go.mod here),
# run on loopback with RBAC on. No Docker needed, so it works where kind cannot.
# It has no node of its own: hack/localnode/ adds one that runs pods as processes.
#
# Usage: cluster.sh build|up|down|env|status|cached|cache-dir|kubectl-path|kubectl [args...]
#   build         build the missing binaries into the cache (idempotent)
#   up            start the cluster, or just report it if it is already healthy;
#                 prints `export KUBECONFIG=...` on stdout (everything else: stderr)
#   down          stop exactly the processes `up` started, remove the state dir
#   env           print the `export KUBECONFIG=...` line
#   status        exit 0 if the cluster is up and healthy
#   kubectl-path  print the kubectl to use with this cluster (machine's if its
#                 version is within one minor of the server, else a built one)
#   kubectl ...   run that kubectl against this cluster
#   cached        exit 0 if the binaries `up` needs are cached (no build needed)
#   cache-dir     print the binary cache dir of the pinned version
#
# Environment:
#   FLOWFLEET_CACHE        binary cache root (default ~/.cache/flowfleet); binaries
#                          go to $FLOWFLEET_CACHE/k8s/<k8s version>/, never the repo
#   FLOWFLEET_CLUSTER_DIR  state dir: certs, pids, logs, etcd data, kubeconfig
#                          (default <repo>/.cluster); tests use their own
#   FLOWFLEET_KUBECTL      a kubectl binary to use, or `build` to build one from the
#                          pinned Kubernetes (default: the machine's kubectl when it
#                          is within one minor version of the server)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"

# The pinned version is read from go.mod so there is a single place to bump it.
K8S_VERSION="$(awk '$1 == "k8s.io/kubernetes" { print $2; exit }' "$HERE/go.mod")"
CACHE="${FLOWFLEET_CACHE:-${HOME:-/root}/.cache/flowfleet}/k8s/$K8S_VERSION"
# Absolute and symlink-free: it is matched against process command lines.
STATE="$(realpath -m "${FLOWFLEET_CLUSTER_DIR:-$REPO/.cluster}")"
# Marker that makes `down` willing to rm -rf the state dir: a mistyped
# FLOWFLEET_CLUSTER_DIR must never make us delete somebody else's directory.
MARKER=".flowfleet-cluster"
SERVICE_CIDR="10.0.0.0/24"
SERVICE_IP="10.0.0.1" # first address of SERVICE_CIDR: the in-cluster `kubernetes` service
# Controllers the tests and the operator rely on. Node-related ones, for the local
# node (hack/localnode): node-lifecycle removes the not-ready taint that admission
# puts on every new Node once it is Ready, and marks a node whose agent died (lease
# not renewed for 40 s) NotReady with its pods unready, as in a real cluster. It only
# taints a node whose agent is silent; the eviction of pods from such a node
# (taint-eviction-controller) is not started, so a slow machine never loses pods to
# it. pod-garbage-collector deletes pods left bound to a Node that was deleted.
CONTROLLERS="deployment-controller,replicaset-controller,garbage-collector-controller"
CONTROLLERS+=",namespace-controller,serviceaccount-controller,serviceaccount-token-controller"
CONTROLLERS+=",root-ca-certificate-publisher-controller,clusterrole-aggregation-controller"
CONTROLLERS+=",node-lifecycle-controller,pod-garbage-collector-controller"
# Process start order; `down` stops them in reverse.
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler)

log() { echo "cluster.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- build ----

go_pkg() {
	case "$1" in
	etcd) echo "./etcd" ;; # our one-line main over go.etcd.io/etcd/server/v3/etcdmain
	*) echo "k8s.io/kubernetes/cmd/$1" ;;
	esac
}

# -s -w: no symbol tables (saves ~30% of disk). The -X flags stamp the version
# as Kubernetes' own build does (hack/lib/version.sh): without them the server
# reports v0.0.0-master, which kubectl cannot parse for its version-skew logic.
ldflags() {
	local minor pkg flags="-s -w"
	minor="$(echo "$K8S_VERSION" | cut -d. -f2)"
	for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
		flags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
		flags+=" -X $pkg.gitTreeState=clean"
	done
	echo "$flags"
}

build_one() {
	local name="$1" started
	[[ -x "$CACHE/$name" ]] && return 0
	command -v go >/dev/null || die "no Go toolchain on PATH and $CACHE/$name is not cached"
	log "building $name for Kubernetes $K8S_VERSION (cold: minutes on 2 cores) ..."
	started=$SECONDS
	# -p 2: these machines have two cores; more parallelism only adds memory use.
	# -mod=readonly: go.mod/go.sum are complete; never rewrite them during a build.
	# -buildvcs=false: stamping our tiny module's VCS state is useless and fails
	# in checkouts git does not trust (other owner).
	# Write to a temp name and rename, so an interrupted build never leaves a
	# truncated binary that a later run would take as cached.
	(cd "$HERE" && GOFLAGS="-mod=readonly -buildvcs=false" go build -p 2 -trimpath -ldflags="$(ldflags)" \
		-o "$CACHE/.$name.tmp" "$(go_pkg "$name")")
	mv -f "$CACHE/.$name.tmp" "$CACHE/$name"
	log "built $name in $((SECONDS - started))s"
}

cmd_build() {
	mkdir -p "$CACHE"
	# One builder at a time per cache (parallel test sessions, make + pytest).
	exec 8>"$CACHE/.build.lock"
	flock 8
	local name
	for name in "${COMPONENTS[@]}"; do build_one "$name"; done
	# kubectl is built only when the machine has none usable with this server,
	# or when asked for (FLOWFLEET_KUBECTL=build: zero version skew).
	if [[ "${FLOWFLEET_KUBECTL:-}" == build || -z "${FLOWFLEET_KUBECTL:-}$(machine_kubectl)" ]]; then
		build_one kubectl
	fi
	exec 8>&-
}

# Prints the machine's kubectl if it is within the supported skew (one minor)
# of the pinned server, else nothing.
machine_kubectl() {
	local k minor want
	k="$(command -v kubectl || true)"
	[[ -n "$k" && "$k" != "$CACHE/kubectl" ]] || return 0
	minor="$("$k" version --client -o json 2>/dev/null | sed -n 's/.*"minor": *"\([0-9]*\).*/\1/p' | head -1)"
	want="$(echo "$K8S_VERSION" | cut -d. -f2)"
	[[ -n "$minor" ]] || return 0
	if ((minor >= want - 1 && minor <= want + 1)); then echo "$k"; fi
}

kubectl_path() {
	if [[ -n "${FLOWFLEET_KUBECTL:-}" && "$FLOWFLEET_KUBECTL" != build ]]; then
		echo "$FLOWFLEET_KUBECTL"
		return
	fi
	local k=""
	[[ "${FLOWFLEET_KUBECTL:-}" == build ]] || k="$(machine_kubectl)"
	if [[ -z "$k" ]]; then
		mkdir -p "$CACHE"
		(exec 8>"$CACHE/.build.lock" && flock 8 && build_one kubectl) >&2
		k="$CACHE/kubectl"
	fi
	echo "$k"
}

# ---------------------------------------------------------- processes ----

# True if the pid recorded for $1 is alive and really is our process: its
# command line names our state dir, which guards against pid reuse.
running() {
	local pidfile="$STATE/$1.pid" pid
	[[ -f "$pidfile" ]] || return 1
	pid="$(cat "$pidfile")"
	[[ "$pid" =~ ^[0-9]+$ ]] || return 1
	local cmdline
	# A zombie still has a /proc entry but an empty cmdline: it counts as gone.
	cmdline="$({ tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null)" || return 1
	[[ "$cmdline" == *"$STATE/"* ]]
}

stop_one() {
	local name="$1" pid i
	running "$name" || { rm -f "$STATE/$name.pid"; return 0; }
	pid="$(cat "$STATE/$name.pid")"
	kill -TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < 100; i++)); do # up to 10 s for a clean shutdown
		running "$name" || break
		sleep 0.1
	done
	if running "$name"; then
		log "$name (pid $pid) ignored TERM; killing"
		kill -KILL "$pid" 2>/dev/null || true
		for ((i = 0; i < 50; i++)); do running "$name" || break; sleep 0.1; done
	fi
	running "$name" && die "could not stop $name (pid $pid)"
	rm -f "$STATE/$name.pid"
}

# Starts "$@" detached from our shell (own session, stdin from /dev/null,
# output to a log), so that callers capturing our output (pytest's subprocess
# pipes) neither wait for it nor get its signals, and records the pid.
start() {
	local name="$1"
	shift
	# Without job control a background child is not a process group leader, so
	# setsid execs in place and $! is the component's own pid. Fds 8 and 9 hold
	# our flocks: a daemon that inherited them would hold the lock for its life.
	setsid "$@" </dev/null >"$STATE/$name.log" 2>&1 8>&- 9>&- &
	echo $! >"$STATE/$name.pid"
}

free_port() {
	# A random port that nothing listens on, below the kernel's ephemeral range
	# (32768+ by default) so no outgoing connection can be holding it. The gap
	# between this check and the bind is a race, but the ports are random and
	# the window short; `up` fails loudly (stopping what it started) if lost.
	local p i
	for ((i = 0; i < 200; i++)); do
		p=$((20000 + RANDOM % 12000))
		[[ " ${USED_PORTS:-} " == *" $p "* ]] && continue
		if [[ -z "$(ss -Htln "sport = :$p" 2>/dev/null)" ]]; then
			USED_PORTS="${USED_PORTS:-} $p"
			echo "$p"
			return
		fi
	done
	die "no free port found"
}

wait_for() { # wait_for <seconds> <description> <command...>
	local timeout="$1" what="$2" deadline
	shift 2
	deadline=$((SECONDS + timeout))
	until "$@" >/dev/null 2>&1; do
		local c
		for c in "${COMPONENTS[@]}"; do
			if [[ -f "$STATE/$c.pid" ]] && ! running "$c"; then
				tail -n 30 "$STATE/$c.log" >&2 || true
				die "$c exited while waiting for $what (log: $STATE/$c.log)"
			fi
		done
		((SECONDS < deadline)) || die "timed out after ${timeout}s waiting for $what"
		sleep 0.2
	done
}

api_get() { # api_get <path>: GET on the API server as admin, body on stdout
	curl -sf --max-time 5 --cacert "$STATE/pki/ca.crt" \
		-H "Authorization: Bearer $(cat "$STATE/pki/admin.token")" \
		"$(cat "$STATE/server")$1"
}
api_ready() { [[ "$(api_get /readyz)" == ok ]]; }
# The controller manager is working once the serviceaccount controller has
# created the `default` service account (pods in `default` need it).
kcm_working() { api_get /api/v1/namespaces/default/serviceaccounts/default; }

healthy() {
	[[ -f "$STATE/kubeconfig" && -f "$STATE/server" ]] || return 1
	local c
	for c in "${COMPONENTS[@]}"; do running "$c" || return 1; done
	api_ready
}

# ---------------------------------------------------------------- pki ----

make_pki() {
	local pki="$STATE/pki"
	mkdir -p "$pki"
	chmod 700 "$pki"
	(
		cd "$pki"
		openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=flowfleet-test-ca" \
			-keyout ca.key -out ca.crt 2>/dev/null
		cat >server.ext <<-EOF
			basicConstraints=CA:FALSE
			keyUsage=digitalSignature,keyEncipherment
			extendedKeyUsage=serverAuth
			subjectAltName=IP:127.0.0.1,IP:$SERVICE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
		EOF
		openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
			-keyout server.key -out server.csr 2>/dev/null
		openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
			-days 3650 -extfile server.ext -out server.crt 2>/dev/null
		# Service-account token signing key pair (apiserver signs, verifies with .pub;
		# the controller manager signs legacy token secrets with the same key).
		openssl genrsa -out sa.key 2048 2>/dev/null
		openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
		openssl rand -hex 32 >admin.token
		openssl rand -hex 32 >kcm.token
		openssl rand -hex 32 >scheduler.token
		# Static tokens (--token-auth-file): token,user,uid,"group1,group2".
		# The controller manager runs every controller under its own identity
		# (--use-service-account-credentials=false), which the bootstrap
		# system:kube-controller-manager role does not cover: it is made a master.
		{
			echo "$(cat admin.token),flowfleet-admin,flowfleet-admin,\"system:masters\""
			echo "$(cat kcm.token),system:kube-controller-manager,kcm,\"system:masters\""
			# The scheduler needs nothing beyond its bootstrap roles (system:kube-scheduler,
			# system:volume-scheduler, the extension-apiserver-authentication reader).
			echo "$(cat scheduler.token),system:kube-scheduler,kube-scheduler,\"\""
		} >tokens.csv
		chmod 600 ./*.key ./*.token tokens.csv
	)
}

write_kubeconfig() { # write_kubeconfig <file> <server> <token> <user>
	cat >"$1" <<-EOF
		apiVersion: v1
		kind: Config
		clusters:
		- name: flowfleet
		  cluster:
		    server: $2
		    certificate-authority-data: $(base64 -w0 <"$STATE/pki/ca.crt")
		users:
		- name: $4
		  user:
		    token: $3
		contexts:
		- name: flowfleet
		  context:
		    cluster: flowfleet
		    user: $4
		    namespace: default
		current-context: flowfleet
	EOF
	chmod 600 "$1"
}

# ------------------------------------------------------------ commands ----

print_env() { echo "export KUBECONFIG=$STATE/kubeconfig"; }

cmd_up() {
	mkdir -p "$STATE"
	exec 9>"$STATE/.lock"
	flock 9
	if healthy; then
		log "already up ($(cat "$STATE/server"))"
		print_env
		return
	fi
	# Leftovers of a crashed or half-started cluster: stop what is ours, start clean.
	local c
	for c in "${COMPONENTS[@]}"; do stop_one "$c"; done
	if [[ ! -f "$STATE/$MARKER" && -n "$(ls -A "$STATE" | grep -vx .lock || true)" ]]; then
		die "$STATE is not empty and not a cluster dir of ours; choose another FLOWFLEET_CLUSTER_DIR"
	fi
	find "$STATE" -mindepth 1 -maxdepth 1 ! -name .lock -exec rm -rf {} +
	touch "$STATE/$MARKER"

	cmd_build

	# From here on, a failure stops whatever was started (logs stay for a look).
	trap 'up_failed' EXIT

	local started=$SECONDS
	local etcd_port etcd_peer_port api_port kcm_port sched_port server
	etcd_port="$(free_port)"
	etcd_peer_port="$(free_port)"
	api_port="$(free_port)"
	kcm_port="$(free_port)"
	sched_port="$(free_port)"
	server="https://127.0.0.1:$api_port"
	echo "$server" >"$STATE/server"
	make_pki
	write_kubeconfig "$STATE/kubeconfig" "$server" "$(cat "$STATE/pki/admin.token")" flowfleet-admin
	write_kubeconfig "$STATE/kcm.kubeconfig" "$server" "$(cat "$STATE/pki/kcm.token")" kube-controller-manager
	write_kubeconfig "$STATE/scheduler.kubeconfig" "$server" "$(cat "$STATE/pki/scheduler.token")" kube-scheduler

	# --unsafe-no-fsync: the data is thrown away with the cluster, and fsync on
	# shared CI disks is what makes etcd (and so every API write) slow.
	mkdir -p "$STATE/etcd-data"
	chmod 700 "$STATE/etcd-data"
	start etcd "$CACHE/etcd" \
		--name=flowfleet --data-dir="$STATE/etcd-data" \
		--listen-client-urls="http://127.0.0.1:$etcd_port" \
		--advertise-client-urls="http://127.0.0.1:$etcd_port" \
		--listen-peer-urls="http://127.0.0.1:$etcd_peer_port" \
		--initial-advertise-peer-urls="http://127.0.0.1:$etcd_peer_port" \
		--initial-cluster="flowfleet=http://127.0.0.1:$etcd_peer_port" \
		--unsafe-no-fsync --log-level=warn
	wait_for 30 "etcd" curl -sf --max-time 2 "http://127.0.0.1:$etcd_port/health"

	start kube-apiserver "$CACHE/kube-apiserver" \
		--etcd-servers="http://127.0.0.1:$etcd_port" \
		--bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$api_port" \
		--cert-dir="$STATE/pki" \
		--tls-cert-file="$STATE/pki/server.crt" --tls-private-key-file="$STATE/pki/server.key" \
		--client-ca-file="$STATE/pki/ca.crt" \
		--token-auth-file="$STATE/pki/tokens.csv" \
		--authorization-mode=Node,RBAC \
		--service-account-issuer=https://kubernetes.default.svc.cluster.local \
		--service-account-key-file="$STATE/pki/sa.pub" \
		--service-account-signing-key-file="$STATE/pki/sa.key" \
		--service-cluster-ip-range="$SERVICE_CIDR" \
		--kubelet-preferred-address-types=InternalIP \
		--profiling=false --v=1
	wait_for 120 "kube-apiserver /readyz" api_ready
	log "kube-apiserver ready at $server after $((SECONDS - started))s"

	start kube-controller-manager "$CACHE/kube-controller-manager" \
		--kubeconfig="$STATE/kcm.kubeconfig" \
		--authentication-kubeconfig="$STATE/kcm.kubeconfig" \
		--authorization-kubeconfig="$STATE/kcm.kubeconfig" \
		--bind-address=127.0.0.1 --secure-port="$kcm_port" --cert-dir="$STATE/kcm-certs" \
		--leader-elect=false \
		--controllers="$CONTROLLERS" \
		--use-service-account-credentials=false \
		--root-ca-file="$STATE/pki/ca.crt" \
		--service-account-private-key-file="$STATE/pki/sa.key" \
		--profiling=false --v=1
	wait_for 60 "kube-controller-manager /healthz" \
		curl -skf --max-time 2 "https://127.0.0.1:$kcm_port/healthz"
	wait_for 60 "the default service account (controller manager)" kcm_working

	# Binds pods to the local node's Node (hack/localnode); with no node, pods stay
	# Pending (PodScheduled=False), as before.
	start kube-scheduler "$CACHE/kube-scheduler" \
		--kubeconfig="$STATE/scheduler.kubeconfig" \
		--authentication-kubeconfig="$STATE/scheduler.kubeconfig" \
		--authorization-kubeconfig="$STATE/scheduler.kubeconfig" \
		--bind-address=127.0.0.1 --secure-port="$sched_port" --cert-dir="$STATE/scheduler-certs" \
		--leader-elect=false --profiling=false --v=1
	wait_for 60 "kube-scheduler /healthz" \
		curl -skf --max-time 2 "https://127.0.0.1:$sched_port/healthz"
	trap - EXIT
	log "control plane $K8S_VERSION up in $((SECONDS - started))s; state in $STATE"
	print_env
}

up_failed() {
	local rc=$? c
	((rc != 0)) || return 0
	for c in "${COMPONENTS[@]}"; do stop_one "$c" || true; done
	log "up failed; stopped what was started. Logs: $STATE/*.log"
	exit "$rc"
}

cmd_down() {
	[[ -d "$STATE" ]] || { log "nothing to stop ($STATE does not exist)"; return 0; }
	exec 9>"$STATE/.lock"
	flock 9
	local i
	for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do stop_one "${COMPONENTS[i]}"; done
	if [[ -f "$STATE/$MARKER" ]]; then
		rm -rf "$STATE"
		log "stopped; removed $STATE"
	else
		log "stopped; $STATE has no $MARKER marker, so it was left in place"
	fi
}

case "${1:-}" in
build) cmd_build ;;
up) cmd_up ;;
down) cmd_down ;;
env) print_env ;;
status) healthy && log "up ($(cat "$STATE/server"))" ;;
kubectl-path) kubectl_path ;;
cache-dir) echo "$CACHE" ;;
cached) # exit 0 if every binary that `up` needs is in the cache
	for c in "${COMPONENTS[@]}"; do [[ -x "$CACHE/$c" ]] || exit 1; done
	;;
kubectl)
	shift
	exec "$(kubectl_path)" --kubeconfig="$STATE/kubeconfig" "$@"
	;;
*)
	sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
	exit 2
	;;
esac

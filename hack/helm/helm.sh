#!/usr/bin/env bash
# Helm for the chart tests and for people without a helm of their own: built from
# its Go module (helm.sh/helm/v3, pinned in go.mod here) with the machine's Go and
# cached outside the repo, like hack/controlplane/cluster.sh does for Kubernetes.
#
# Usage: helm.sh build|path|cached|version-pin|<helm args...>
#   build        build helm into the cache unless it is there (idempotent)
#   path         print the cached binary's path, building it first if missing
#   cached       exit 0 if the binary is cached (no build needed)
#   version-pin  print the pinned helm version
#   <args...>    run the cached helm (building it first if missing) with these args
#
# Environment:
#   FLOWFLEET_CACHE   binary cache root (default ~/.cache/flowfleet); the binary
#                     goes to $FLOWFLEET_CACHE/helm/<helm version>/helm, never the repo
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# The pinned versions come from go.mod, so there is one place to bump them.
HELM_VERSION="$(awk '$1 == "helm.sh/helm/v3" { print $2; exit }' "$HERE/go.mod")"
CLIENT_GO="$(awk '$1 == "k8s.io/client-go" { print $2; exit }' "$HERE/go.mod")"
CACHE="${FLOWFLEET_CACHE:-${HOME:-/root}/.cache/flowfleet}/helm/$HELM_VERSION"
BIN="$CACHE/helm"

log() { echo "helm.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

[[ -n "$HELM_VERSION" && -n "$CLIENT_GO" ]] || die "cannot read the pinned versions from $HERE/go.mod"

# As Helm's own Makefile does: stamp the version (otherwise `helm version` says
# "v3.22" with no patch) and the Kubernetes version `helm template` and `helm lint`
# assume without a cluster: client-go v0.N.x is Kubernetes 1.N.
ldflags() {
	local minor
	minor="$(echo "$CLIENT_GO" | cut -d. -f2)"
	local flags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
	flags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
	flags+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1"
	flags+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$minor"
	flags+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1"
	flags+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$minor"
	echo "$flags"
}

cmd_build() {
	[[ -x "$BIN" ]] && return 0
	mkdir -p "$CACHE"
	# One builder at a time per cache (CI step, parallel pytest sessions).
	exec 8>"$CACHE/.build.lock"
	flock 8
	if [[ ! -x "$BIN" ]]; then # another builder may have finished while we waited
		command -v go >/dev/null || die "no Go toolchain on PATH and $BIN is not cached"
		log "building helm $HELM_VERSION (cold: a few minutes on 2 cores) ..."
		local started=$SECONDS
		# -p 2: two cores here. -mod=readonly: go.mod/go.sum are complete, never
		# rewrite them. -buildvcs=false: our tiny module's VCS state is useless and
		# fails in checkouts git does not trust. CGO off, as Helm's release builds.
		# A temp name then rename: an interrupted build never leaves a truncated binary.
		(cd "$HERE" && CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false" \
			go build -p 2 -trimpath -ldflags="$(ldflags)" -o "$CACHE/.helm.tmp" helm.sh/helm/v3/cmd/helm)
		mv -f "$CACHE/.helm.tmp" "$BIN"
		log "built helm $HELM_VERSION in $((SECONDS - started))s"
	fi
	exec 8>&-
}

case "${1:-}" in
build) cmd_build ;;
path)
	cmd_build
	echo "$BIN"
	;;
cached) [[ -x "$BIN" ]] ;;
version-pin) echo "$HELM_VERSION" ;;
"") die "usage: helm.sh build|path|cached|version-pin|<helm args...>" ;;
*)
	cmd_build
	exec "$BIN" "$@"
	;;
esac

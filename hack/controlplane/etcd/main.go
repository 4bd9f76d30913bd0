// Command etcd is upstream etcd's server entry point, built from the
// go.etcd.io/etcd/server/v3 version that the pinned k8s.io/kubernetes requires
// (see go.mod), so the control plane runs against the etcd it is tested with.
// It is the same one-liner as etcd's own main.go, whose module (go.etcd.io/etcd/v3)
// cannot be built with `go install pkg@version` because of its replace directives.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}

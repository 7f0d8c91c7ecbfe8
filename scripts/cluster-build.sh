#!/usr/bin/env bash
# Builds the test cluster's programs from their Go modules, at the versions pinned by the wrapper
# modules in cluster/ (their go.mod and go.sum are committed; the binaries never are):
#   cluster/kubernetes  kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl
#   cluster/etcd        etcd
#   cluster/containerd  containerd, containerd-shim-runc-v2, ctr
#   cluster/runc        runc (with seccomp, through cgo and Debian's libseccomp-dev): Debian's runc
#                       1.1.5 cannot start containerd 2.2's containers here ("can't get final
#                       child's PID from pipe: EOF"), and Debian's crun 1.8.1 refuses their OCI
#                       spec version ("unknown version specified")
# The binaries go to a cache outside the repository, one folder per component keyed by its pinned
# version and a hash of its go.mod/go.sum, so only the first run on a machine pays for the build
# (about 25 minutes on 2 cores, cold). The Go module and build caches are Go's own (~/go, ~/.cache).
# Prints the folder that holds all binaries on its last line.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${SIDEKEY_CACHE:-$HOME/.cache/sidekey}
export GOWORK=off GOFLAGS=-mod=mod CGO_ENABLED=0
log() { printf '[cluster-build] %s\n' "$*" >&2; }

command -v go >/dev/null || { log "go is not installed: the cluster is built from Go modules (Go 1.25 or newer)"; exit 1; }

# The version a wrapper module pins for a module path.
pinned() { (cd "$root/cluster/$1" && go list -m -f '{{.Version}}' "$2"); }
key() { cat "$root/cluster/$1/go.mod" "$root/cluster/$1/go.sum" | sha256sum | cut -c1-12; }

# build COMPONENT VERSION OUTDIR LDFLAGS TAGS PACKAGE...
build() {
  local comp=$1 version=$2 out=$3 ldflags=$4 tags=$5
  shift 5
  if [ -f "$out/.complete" ]; then
    log "$comp $version: cached in $out"
    return 0
  fi
  log "$comp $version: building $* (first run on this machine; the build log is $out.log)"
  rm -rf "$out" && mkdir -p "$out"
  local started=$SECONDS
  if ! (cd "$root/cluster/$comp" && go build -trimpath -tags "$tags" -ldflags "$ldflags" -o "$out/" "$@") >"$out.log" 2>&1; then
    log "$comp $version: the build failed; last lines of $out.log:"
    tail -n 15 "$out.log" >&2
    if grep -qE 'dial tcp|proxy.golang.org|no such host|i/o timeout' "$out.log"; then
      log "(a Go module could not be downloaded: is the Go module proxy reachable? GOPROXY=$(go env GOPROXY))"
    fi
    exit 1
  fi
  touch "$out/.complete"
  log "$comp $version: built in $((SECONDS - started)) s"
}

k8s=$(pinned kubernetes k8s.io/kubernetes)
etcd=$(pinned etcd go.etcd.io/etcd/server/v3)
ctrd=$(pinned containerd github.com/containerd/containerd/v2)
runc=$(pinned runc github.com/opencontainers/runc)
minor=$(echo "$k8s" | cut -d. -f2)

k8s_out="$cache/cluster/kubernetes-$k8s-$(key kubernetes)"
etcd_out="$cache/cluster/etcd-$etcd-$(key etcd)"
ctrd_out="$cache/cluster/containerd-$ctrd-$(key containerd)"
runc_out="$cache/cluster/runc-$runc-$(key runc)"
mkdir -p "$cache/cluster"

kver="-X k8s.io/component-base/version.gitVersion=$k8s -X k8s.io/component-base/version.gitMajor=1"
kver+=" -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
kver+=" -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z"
kver+=" -X k8s.io/client-go/pkg/version.gitVersion=$k8s -X k8s.io/client-go/pkg/version.gitMajor=1"
kver+=" -X k8s.io/client-go/pkg/version.gitMinor=$minor"

# The smaller builds first, so a machine without the module proxy fails fast.
build etcd "$etcd" "$etcd_out" "-s -w" "" .
build containerd "$ctrd" "$ctrd_out" "-s -w -X github.com/containerd/containerd/v2/version.Version=$ctrd" no_btrfs \
  github.com/containerd/containerd/v2/cmd/containerd \
  github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2 \
  github.com/containerd/containerd/v2/cmd/ctr
CGO_ENABLED=1 build runc "$runc" "$runc_out" "-s -w -X main.version=${runc#v}" seccomp github.com/opencontainers/runc
build kubernetes "$k8s" "$k8s_out" "-s -w $kver" "" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kubectl

# One folder of links, named by the three keys, for cluster.sh and the tests.
bin="$cache/cluster/bin-$(printf '%s' "$k8s_out$etcd_out$ctrd_out$runc_out" | sha256sum | cut -c1-12)"
if [ ! -d "$bin" ]; then
  mkdir -p "$bin.tmp"
  for d in "$k8s_out" "$etcd_out" "$ctrd_out" "$runc_out"; do
    for f in "$d"/*; do ln -sf "$f" "$bin.tmp/$(basename "$f")"; done
  done
  mv "$bin.tmp" "$bin"
fi
echo "$bin"

#!/usr/bin/env bash
# Builds the pinned upstream control-plane binaries (etcd, kube-apiserver,
# kube-controller-manager, kubectl) and helm from their published Go modules,
# once, into $SR_CACHE/bin/<version>/. Idempotent: a binary that exists is kept.
#
# k8s.io/kubernetes cannot be `go install`ed directly: its go.mod replaces the
# staging modules with ./staging/... paths, which are ignored in a dependency.
# We generate a wrapper module that requires k8s.io/kubernetes and replaces
# every staging module with its published v0.Y.Z, reading the list from the
# published go.mod so a version bump needs no edit here.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
SR_CACHE=${SR_CACHE:-$HOME/.cache/siterecovery}
export GOFLAGS="${GOFLAGS:-} -trimpath" CGO_ENABLED=0
bindir="$SR_CACHE/bin"
mkdir -p "$bindir"

log() { printf '[build-controlplane] %s\n' "$*" >&2; }

# The Go build and module caches of this one-time build take about 5 GB (3.6 GB of objects,
# 1.3 GB of sources) that nothing needs once the binaries exist, and CI builds the
# workspace on the same disk right after. Unless the caller chose its own, they go to a
# private directory that is removed when the build succeeds (kept after a failure, so a
# retry does not download everything again).
gotmp=""
if [ -z "${GOCACHE:-}" ] && [ -z "${GOMODCACHE:-}" ]; then
  gotmp="$SR_CACHE/go.tmp"
  export GOCACHE="$gotmp/build" GOMODCACHE="$gotmp/mod"
fi

build_kube() {
  local out="$bindir/kube-$KUBE_VERSION"
  local cmds=(kube-apiserver kube-controller-manager kubectl)
  local missing=()
  for c in "${cmds[@]}"; do [ -x "$out/$c" ] || missing+=("$c"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  local mod="$SR_CACHE/src/kube-$KUBE_VERSION"
  mkdir -p "$mod" "$out"
  local minor=${KUBE_VERSION#v1.}; minor=${minor%%.*}
  local staging_ver="v0.${KUBE_VERSION#v1.}"
  local gomod
  gomod=$(cd "$mod" && go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  if [ ! -f "$mod/go.mod" ]; then
    log "generating wrapper module for k8s.io/kubernetes $KUBE_VERSION"
    {
      echo "module local/kube-wrapper"
      echo
      echo "go 1.24.0"
      echo
      grep '^godebug' "$gomod" || true
      echo
      echo "require k8s.io/kubernetes $KUBE_VERSION"
      echo
      grep -E '^\s+k8s.io/[a-z0-9-]+ => ./staging/' "$gomod" \
        | awk -v v="$staging_ver" '{print "replace " $1 " => " $1 " " v}'
    } >"$mod/go.mod"
    cat >"$mod/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
    (cd "$mod" && go mod tidy)
  fi
  local pkg=k8s.io/component-base/version pkg2=k8s.io/client-go/pkg/version
  local date; date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  local ld=""
  for p in $pkg $pkg2; do
    ld+=" -X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    ld+=" -X $p.gitTreeState=clean -X $p.buildDate=$date"
  done
  for c in "${missing[@]}"; do
    log "building $c $KUBE_VERSION (several minutes on a cold cache)"
    (cd "$mod" && go build -ldflags "-s -w $ld" -o "$out/$c.tmp" "k8s.io/kubernetes/cmd/$c")
    mv "$out/$c.tmp" "$out/$c"
  done
}

build_etcd() {
  local out="$bindir/etcd-$ETCD_VERSION"
  [ -x "$out/etcd" ] && return 0
  local mod="$SR_CACHE/src/etcd-$ETCD_VERSION"
  mkdir -p "$mod" "$out"
  if [ ! -f "$mod/go.mod" ]; then
    log "generating wrapper module for etcd $ETCD_VERSION"
    cat >"$mod/main.go" <<'GO'
// Command etcd is upstream etcd's server main, built from its published module.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
    (cd "$mod" && go mod init local/etcd-wrapper >/dev/null 2>&1 \
      && go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" && go mod tidy)
  fi
  log "building etcd $ETCD_VERSION"
  (cd "$mod" && go build -ldflags "-s -w" -o "$out/etcd.tmp" .)
  mv "$out/etcd.tmp" "$out/etcd"
}

build_helm() {
  local out="$bindir/helm-$HELM_VERSION"
  [ -x "$out/helm" ] && return 0
  mkdir -p "$out"
  log "building helm $HELM_VERSION"
  GOBIN="$out" go install -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
}

want=${*:-etcd kube helm}
for w in $want; do "build_$w"; done
if [ -n "$gotmp" ] && [ -d "$gotmp" ]; then
  # Module files are read-only; `go clean -modcache` knows how to remove them.
  go clean -modcache && rm -rf "$gotmp"
fi
# Stable names for scripts and tests.
ln -sfn "kube-$KUBE_VERSION" "$bindir/kube"
ln -sfn "etcd-$ETCD_VERSION" "$bindir/etcd"
[ -d "$bindir/helm-$HELM_VERSION" ] && ln -sfn "helm-$HELM_VERSION" "$bindir/helm"
log "binaries ready in $bindir"

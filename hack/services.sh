# Sourced by test.sh and bench.sh: starts a private control plane and Azurite under a
# name (their own state directories and ports, so a `make demo` cluster and other runs
# are left alone), exports KUBECONFIG and SR_AZURITE_ENDPOINT, and stops both on exit.
#
#   private_services <name> <etcd-port> <apiserver-port> <kcm-port> <azurite-port>
private_services() {
  local name=$1 hack
  hack=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  export SR_CLUSTER_DIR=$PWD/target/$name-cluster SR_ETCD_PORT=$2 SR_APISERVER_PORT=$3 SR_KCM_PORT=$4
  export SR_AZURITE_PORT=$5 SR_AZURITE_DIR=$PWD/target/$name-azurite
  # shellcheck disable=SC2064  # expand now: the paths are fixed for this run
  trap "'$hack/cluster.sh' down >/dev/null 2>&1 || true; '$hack/azurite.sh' down >/dev/null 2>&1 || true" EXIT
  "$hack/cluster.sh" down >/dev/null 2>&1 || true
  "$hack/cluster.sh" up
  # shellcheck disable=SC1091
  source "$SR_CLUSTER_DIR/env.sh"
  # Blob storage: Azurite on loopback (installed once from npm into $SR_CACHE), empty.
  "$hack/azurite.sh" down >/dev/null 2>&1 || true
  rm -rf "$SR_AZURITE_DIR"
  "$hack/azurite.sh" up
  eval "$("$hack/azurite.sh" env)"
}

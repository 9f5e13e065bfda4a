#!/usr/bin/env bash
# `make test`: the whole suite. Lints, builds every test once, starts a private local
# control plane (its own state directory and ports, so a running `make demo` cluster is
# left alone) and Azurite for Blob storage, runs all tests against them, and always
# stops both.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/.."
start=$(date +%s)
"$here/tools.sh"
make --no-print-directory lint
cargo build --workspace --tests

export SR_CLUSTER_DIR=${SR_TEST_CLUSTER_DIR:-$PWD/target/test-cluster}
export SR_ETCD_PORT=${SR_TEST_ETCD_PORT:-23890} SR_APISERVER_PORT=${SR_TEST_APISERVER_PORT:-16543} SR_KCM_PORT=${SR_TEST_KCM_PORT:-16544}
export SR_AZURITE_PORT=${SR_TEST_AZURITE_PORT:-10010} SR_AZURITE_DIR=$PWD/target/test-azurite
trap '"$here/cluster.sh" down >/dev/null 2>&1 || true; "$here/azurite.sh" down >/dev/null 2>&1 || true' EXIT
"$here/cluster.sh" down >/dev/null 2>&1 || true
"$here/cluster.sh" up
# shellcheck disable=SC1091
source "$SR_CLUSTER_DIR/env.sh"
# Blob storage: Azurite on loopback (installed once from npm into $SR_CACHE).
"$here/azurite.sh" down >/dev/null 2>&1 || true
rm -rf "$SR_AZURITE_DIR"
"$here/azurite.sh" up
eval "$("$here/azurite.sh" env)"
cargo test --workspace --no-fail-fast
echo "[test] finished in $(( $(date +%s) - start ))s"

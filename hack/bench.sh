#!/usr/bin/env bash
# `make bench`: the benchmarks (never part of `make test`). Builds release binaries,
# starts a private local control plane (its own state directory and ports, so a `make
# demo` cluster and other engineers' clusters are left alone), runs the operator scale
# benchmark against it, and always stops it. Arguments go to the benchmark binary
# (`make bench BENCH_ARGS="--servers 200"`); results land in target/bench/.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/.."
start=$(date +%s)
"$here/tools.sh"
# Timing figures mean something only for optimised code.
cargo build --release -p siterecovery-operator --bin siterecovery-operator -p siterecovery-bench --bin operator-scale

export SR_CLUSTER_DIR=${SR_BENCH_CLUSTER_DIR:-$PWD/target/bench-cluster}
export SR_ETCD_PORT=${SR_BENCH_ETCD_PORT:-28790} SR_APISERVER_PORT=${SR_BENCH_APISERVER_PORT:-21443} SR_KCM_PORT=${SR_BENCH_KCM_PORT:-21444}
export SR_AZURITE_PORT=${SR_BENCH_AZURITE_PORT:-10040} SR_AZURITE_DIR=$PWD/target/bench-azurite
trap '"$here/cluster.sh" down >/dev/null 2>&1 || true; "$here/azurite.sh" down >/dev/null 2>&1 || true' EXIT
"$here/cluster.sh" down >/dev/null 2>&1 || true
"$here/cluster.sh" up
# shellcheck disable=SC1091
source "$SR_CLUSTER_DIR/env.sh"
# The benchmark's policies store in Azurite (servers' data is deleted with them).
"$here/azurite.sh" down >/dev/null 2>&1 || true
rm -rf "$SR_AZURITE_DIR"
"$here/azurite.sh" up
eval "$("$here/azurite.sh" env)"
target/release/operator-scale --operator-bin target/release/siterecovery-operator "$@"
echo "[bench] finished in $(( $(date +%s) - start ))s"

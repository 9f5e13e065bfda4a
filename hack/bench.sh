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

# shellcheck source=services.sh
source "$here/services.sh"
private_services bench "${SR_BENCH_ETCD_PORT:-28790}" "${SR_BENCH_APISERVER_PORT:-21443}" "${SR_BENCH_KCM_PORT:-21444}" "${SR_BENCH_AZURITE_PORT:-10040}"
target/release/operator-scale --operator-bin target/release/siterecovery-operator "$@"
echo "[bench] finished in $(( $(date +%s) - start ))s"

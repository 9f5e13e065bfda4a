#!/usr/bin/env bash
# `make bench`: the benchmarks (never part of `make test`). Builds release binaries, then
#   1. operator scale: starts a private local control plane (its own state directory and
#      ports, so a `make demo` cluster and other engineers' clusters are left alone), runs
#      the operator-scale benchmark against it, and always stops it. Arguments go to that
#      binary (`make bench BENCH_ARGS="--servers 200"`).
#   2. data plane: hack/bench-dataplane.sh (agent and process server against restic and
#      rsync, with its own Azurite; as root also the RPO on a loop device with eBPF).
# SR_BENCH=operator or SR_BENCH=dataplane runs only one. Results land in target/bench/.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/.."
start=$(date +%s)
which=${SR_BENCH:-all}
case "$which" in all | operator | dataplane) ;; *) echo "SR_BENCH must be all, operator or dataplane" >&2; exit 2 ;; esac
"$here/tools.sh"
# Timing figures mean something only for optimised code. Only what the chosen benchmarks
# run is built (the machine is small and often shared).
packages=()
if [ "$which" != dataplane ]; then
  packages+=(-p siterecovery-operator --bin siterecovery-operator -p siterecovery-bench --bin operator-scale)
fi
if [ "$which" != operator ]; then
  [ "$which" = all ] || packages+=(-p siterecovery-bench)
  packages+=(--bin dataplane -p siterecovery-agent --bin siterecovery-agent)
  packages+=(-p siterecovery-process-server --bin siterecovery-process-server)
fi
cargo build --release "${packages[@]}"

if [ "$which" != dataplane ]; then
  (
    # shellcheck source=services.sh
    source "$here/services.sh"
    private_services bench "${SR_BENCH_ETCD_PORT:-28790}" "${SR_BENCH_APISERVER_PORT:-21443}" "${SR_BENCH_KCM_PORT:-21444}" "${SR_BENCH_AZURITE_PORT:-10040}"
    target/release/operator-scale --operator-bin target/release/siterecovery-operator "$@"
  )
fi
if [ "$which" != operator ]; then
  "$here/bench-dataplane.sh"
fi
echo "[bench] finished in $(( $(date +%s) - start ))s"

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
cargo build --workspace --bins --tests

# shellcheck source=services.sh
source "$here/services.sh"
private_services test "${SR_TEST_ETCD_PORT:-23890}" "${SR_TEST_APISERVER_PORT:-16543}" "${SR_TEST_KCM_PORT:-16544}" "${SR_TEST_AZURITE_PORT:-10010}"
cargo test --workspace --no-fail-fast
echo "[test] finished in $(( $(date +%s) - start ))s"

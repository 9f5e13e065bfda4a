#!/usr/bin/env bash
# Installs what the build and tests need, once: rustfmt and clippy, and the pinned
# control-plane binaries (hack/build-controlplane.sh). Idempotent and quiet when done.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
for tool in go cargo openssl curl; do
  command -v "$tool" >/dev/null || { echo "[tools] $tool is required but not installed" >&2; exit 1; }
done
installed=$(rustup component list --installed 2>/dev/null || true)
for c in rustfmt clippy; do
  grep -q "^$c" <<<"$installed" || rustup component add "$c"
done
"$here/build-controlplane.sh"

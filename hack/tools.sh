#!/usr/bin/env bash
# Installs what the build and tests need, once: rustfmt and clippy, clang and libbpf's
# build dependencies (apt), and the pinned control-plane binaries
# (hack/build-controlplane.sh). Idempotent and quiet when done.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
for tool in go cargo openssl curl; do
  command -v "$tool" >/dev/null || { echo "[tools] $tool is required but not installed" >&2; exit 1; }
done
installed=$(rustup component list --installed 2>/dev/null || true)
for c in rustfmt clippy; do
  grep -q "^$c" <<<"$installed" || rustup component add "$c"
done
# crates/tracker compiles its eBPF program with clang and builds the vendored libbpf
# against the system libelf and zlib (found with pkg-config, built with make).
missing=()
command -v clang >/dev/null || missing+=(clang)
for pkg in libelf-dev zlib1g-dev pkg-config make; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
# crates/store's VHD tests check our fixed-VHD footers with qemu-img (format `vpc`).
command -v qemu-img >/dev/null || missing+=(qemu-utils)
if ((${#missing[@]})); then
  echo "[tools] installing ${missing[*]}" >&2
  command -v apt-get >/dev/null || { echo "[tools] apt-get not found: install ${missing[*]} by hand" >&2; exit 1; }
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
"$here/build-controlplane.sh"

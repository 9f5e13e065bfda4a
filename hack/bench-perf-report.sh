#!/usr/bin/env bash
# Summarises a `perf record` profile the data-plane benchmark took of an initial replication
# (BENCH_DP_PERF=1 hack/bench-dataplane.sh; files in target/bench/perf/). For each process
# named in <profile>.pids (agent, process server, Azurite): its CPU seconds in the profile,
# by thread name, and its top symbols (percentages of that process's samples); first the
# whole machine by process, which shows what else ran.
#
#   hack/bench-perf-report.sh target/bench/perf/initial-image.data [symbols per process]
set -euo pipefail
data=${1:?usage: $0 <perf.data> [top symbols]}
top=${2:-25}
pids=${data%.data}.pids
[ -s "$pids" ] || { echo "no $pids beside $data" >&2; exit 1; }
# `perf script` is the slow part: read once, each sample's thread name, pid and period,
# and its pid, period, address, symbol and library. Shares are counted from these, per
# process: `perf report --pid` with a sort key that leaves the process out merges a
# symbol's samples across processes first (the kernel's and libc's symbols of all three
# counted as this one's), which inflated the shared symbols before 2026-11-29.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
perf script -i "$data" -F comm,pid,period -G 2>/dev/null >"$tmp/threads"
perf script -i "$data" -F pid,period,ip,sym,dso -G 2>/dev/null >"$tmp/symbols"
# From "period<TAB>key" lines: each key's share of the periods, largest first (≥ 0.5 %).
shares() {
  awk -F'\t' '{ c[$2] += $1; t += $1 } END { for (k in c) if (100 * c[k] / t >= 0.5) printf "%7.2f%%  %s\n", 100 * c[k] / t, k }' |
    sort -rn
}
# Process $1's samples by thread name (which may hold spaces: the pid and period end the line).
threads() {
  awk -v p="$1" '$(NF - 1) == p { s = $1; for (i = 2; i < NF - 1; i++) s = s " " $i; print $NF "\t" s }' "$tmp/threads" |
    shares | head -10
}
# Process $1's samples by library and symbol (a symbol may hold spaces; the library ends the line).
symbols() {
  awk -v p="$1" '$1 == p { s = $4; for (i = 5; i < NF; i++) s = s " " $i; d = $NF; gsub(/[()]/, "", d); sub(/.*\//, "", d)
      print $2 "\t" d "  " s }' "$tmp/symbols" | shares | head -"$2"
}

# cpu-clock samples carry their period in nanoseconds of CPU.
echo "== whole machine: CPU seconds by process (pid, command of its first sample)"
awk '{ p = $(NF - 1); if (!(p in n)) n[p] = $1; c[p] += $NF; t += $NF }
     END { for (p in c) printf "%8.2f s  %6.1f %%  %s %s\n", c[p] / 1e9, 100 * c[p] / t, p, n[p]; printf "%8.2f s  total\n", t / 1e9 }' "$tmp/threads" |
  sort -rn | head -15
while read -r name pid; do
  [ -n "$pid" ] || continue
  echo
  echo "== $name (pid $pid): by thread name, then the top $top symbols"
  threads "$pid"
  symbols "$pid" "$top"
done <"$pids"

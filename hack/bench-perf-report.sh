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
# One process's share of the samples by thread name, or by library and symbol, from
# `perf script`: `perf report --pid` with a sort key that leaves the process out merges
# a symbol's samples across processes first (the kernel's and libc's symbols of all three
# counted as this one's), which inflated the shared symbols before 2026-11-29.
threads() {
  perf script -i "$data" -F comm,pid,period -G 2>/dev/null |
    awk -v p="$1" '$(NF - 1) == p { s = $1; for (i = 2; i < NF - 1; i++) s = s " " $i; c[s] += $NF; t += $NF }
      END { for (k in c) if (100 * c[k] / t >= 0.5) printf "%7.2f%%  %s\n", 100 * c[k] / t, k }' | sort -rn | head -10
}
symbols() {
  perf script -i "$data" -F pid,period,ip,sym,dso -G 2>/dev/null |
    awk -v p="$1" '$1 == p { s = $4; for (i = 5; i < NF; i++) s = s " " $i; d = $NF; gsub(/[()]/, "", d); sub(/.*\//, "", d)
        c[d "  " s] += $2; t += $2 }
      END { for (k in c) if (100 * c[k] / t >= 0.5) printf "%7.2f%%  %s\n", 100 * c[k] / t, k }' | sort -rn | head -"$2"
}

# cpu-clock samples carry their period in nanoseconds of CPU.
echo "== whole machine: CPU seconds by process (pid, command of its first sample)"
names=$(perf script -i "$data" -F comm,pid 2>/dev/null | awk '!($NF in n) { n[$NF] = $1; print $NF, $1 }')
perf script -i "$data" -F pid,period 2>/dev/null |
  awk -v names="$names" 'BEGIN { k = split(names, a, "\n"); for (i = 1; i <= k; i++) { split(a[i], f, " "); n[f[1]] = f[2] } }
       { c[$1] += $2; t += $2 }
       END { for (p in c) printf "%8.2f s  %6.1f %%  %s %s\n", c[p] / 1e9, 100 * c[p] / t, p, n[p]; printf "%8.2f s  total\n", t / 1e9 }' |
  sort -rn | head -15
while read -r name pid; do
  [ -n "$pid" ] || continue
  echo
  echo "== $name (pid $pid): by thread name, then the top $top symbols"
  threads "$pid"
  symbols "$pid" "$top"
done <"$pids"

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
report() {
  perf report -i "$data" --stdio --no-children --percentage relative --percent-limit 0.5 "$@" 2>/dev/null |
    grep -v '^#' | grep -v '^$' || true
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
  report --pid "$pid" --sort comm | head -10
  report --pid "$pid" --sort dso,sym | head -"$top"
done <"$pids"

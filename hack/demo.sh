#!/usr/bin/env bash
# `make demo`: the main job end to end on the embedded default. Builds, starts the local
# control plane and Azurite, installs the Helm chart, runs the chart's pods as local
# processes (there is no kubelet here), protects a sample server through the real
# registration flow, shows initial replication, writes data, runs a test failover through
# a RecoveryPlan and checks the recovered disks byte for byte, then prints a summary.
# Everything stays up for exploring; `make demo-down` stops it. Safe to run again: each
# run starts from a fresh demo namespace.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/.."
ns=siterecovery-demo
sys=siterecovery-system
demo=$PWD/target/demo
server=web-01
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
elapsed() { echo $(( $(date +%s) - $1 ))s; }

stop_processes() {
  for p in "$demo"/*.pid; do
    [ -f "$p" ] || continue
    kill "$(cat "$p")" 2>/dev/null || true
    rm -f "$p"
  done
}

if [ "${1:-}" = down ]; then
  if [ -f target/cluster/env.sh ]; then
    # shellcheck disable=SC1091
    source target/cluster/env.sh
    kubectl delete namespace "$ns" --wait=false >/dev/null 2>&1 || true
    for _ in $(seq 1 60); do kubectl get namespace "$ns" >/dev/null 2>&1 || break; sleep 1; done
  fi
  stop_processes
  "$here/azurite.sh" down || true
  "$here/cluster.sh" down
  exit 0
fi

t0=$(date +%s)
step "Installing tools and building (cached after the first run)"
"$here/tools.sh"
cargo build --workspace --bins
bin=$PWD/target/debug
# `kubectl siterecovery` is the plugin binary kubectl-siterecovery found on PATH.
export PATH=$bin:$PATH

step "Starting the local control plane (etcd, kube-apiserver, kube-controller-manager)"
"$here/cluster.sh" up
# shellcheck disable=SC1091
source target/cluster/env.sh

step "Starting Azurite (Blob storage on loopback)"
"$here/azurite.sh" up
eval "$("$here/azurite.sh" env)"

mkdir -p "$demo"
stop_processes

step "helm install siterecovery charts/siterecovery -n $sys"
helm upgrade --install siterecovery charts/siterecovery -n "$sys" --create-namespace \
  --set operator.logFormat=text --set operator.watchNamespace="$ns" >/dev/null
helm list -n "$sys"
# The CRDs come with the chart; wait until the API serves them.
kubectl wait --for condition=Established --timeout=60s \
  crd/replicationpolicies.siterecovery.io crd/protectedservers.siterecovery.io \
  crd/recoveryplans.siterecovery.io crd/failbackjobs.siterecovery.io >/dev/null

step "Running the chart's pods as local processes (the harness plays the kubelet)"
run_pods() { # namespace selector name
  RUST_LOG=info "$bin/sr-harness" run-pods --namespace "$1" --selector "$2" \
    --env SR_LISTEN=127.0.0.1:0 --env SR_METRICS=127.0.0.1:0 --env RUST_LOG=info \
    --ports-file "$demo/$3-ports.json" >"$demo/$3-runner.log" 2>&1 &
  echo $! >"$demo/$3-runner.pid"
}
run_pods "$sys" app.kubernetes.io/component=operator operator
run_pods "$ns" app.kubernetes.io/component=process-server process-servers
port_of() { # name pod-prefix container-port
  python3 - "$demo/$1-ports.json" "$2" "$3" <<'PY'
import json, sys
try:
    ports = json.load(open(sys.argv[1]))
except Exception:
    sys.exit(1)
for pod, m in ports.items():
    if pod.startswith(sys.argv[2]) and sys.argv[3] in m:
        print(m[sys.argv[3]]); sys.exit(0)
sys.exit(1)
PY
}
wait_port() { # name pod-prefix container-port
  for _ in $(seq 1 120); do port_of "$@" && return 0; sleep 0.5; done
  echo "no pod $2 is running; runner log:" >&2; cat "$demo/$1-runner.log" >&2; return 1
}
# After an upgrade the Deployment replaces its pod: use the one that stays.
current_pod() { # namespace selector
  for _ in $(seq 1 120); do
    pods=$(kubectl get pods -n "$1" -l "$2" -o json | python3 -c '
import json, sys
items = [p for p in json.load(sys.stdin)["items"] if not p["metadata"].get("deletionTimestamp")]
print(items[0]["metadata"]["name"] if len(items) == 1 else "")')
    [ -n "$pods" ] && { echo "$pods"; return 0; }
    sleep 0.5
  done
  echo "no single running pod for $2 in $1" >&2; return 1
}
operator_pod=$(current_pod "$sys" app.kubernetes.io/component=operator)
registration=$(wait_port operator "$operator_pod" 9444)
if kubectl get namespace "$ns" >/dev/null 2>&1; then
  step "Removing the previous demo namespace"
  # Servers first, while the storage credential still exists, so their data is deleted
  # too; the operator (finalizers) and the pod runners (pod deletions) must still run.
  kubectl delete protectedservers --all -n "$ns" --timeout=60s >/dev/null || true
  kubectl delete namespace "$ns" --wait=false >/dev/null
  for _ in $(seq 1 120); do kubectl get namespace "$ns" >/dev/null 2>&1 || break; sleep 1; done
  if kubectl get namespace "$ns" >/dev/null 2>&1; then
    echo "namespace $ns is still terminating; what is left:" >&2
    kubectl get all,protectedservers,pvc -n "$ns" >&2 || true
    exit 1
  fi
fi
kubectl create namespace "$ns" >/dev/null

kubectl get pods -n "$sys" -o wide
echo "operator: registration endpoint on 127.0.0.1:$registration (container port 9444)"

step "Protecting $server: a storage credential, a policy (5 s crash-consistent points), the server"
rm -rf "$demo/disks" "$demo/agent" "$demo/recovered"
mkdir -p "$demo/disks"
# The server's disks: a 48 MiB system disk with real files' bytes, a sparse 256 MiB data disk.
find /usr/lib -type f -size +100k 2>/dev/null | head -n 200 | xargs cat 2>/dev/null | head -c $((48 << 20)) >"$demo/disks/os.img" || true
truncate -s 48M "$demo/disks/os.img"
truncate -s 256M "$demo/disks/data.img"
dd if=/dev/urandom of="$demo/disks/data.img" bs=1M count=8 seek=100 conv=notrunc status=none
kubectl create secret generic storage -n "$ns" --from-literal=sasToken="$("$bin/sr-harness" azurite-sas)" >/dev/null
kubectl apply --server-side -n "$ns" -f - <<YAML
apiVersion: siterecovery.io/v1alpha1
kind: ReplicationPolicy
metadata: {name: gold}
spec:
  rpoThreshold: 1m
  crashConsistentInterval: 5s
  retention: {window: 24h}
  target:
    endpoint: $SR_AZURITE_ENDPOINT
    container: demo-dr
    credential: {secretRef: {name: storage}}
---
apiVersion: siterecovery.io/v1alpha1
kind: ProtectedServer
metadata: {name: $server}
spec:
  policyRef: {name: gold}
  agent: {hostname: $server.example.com}
  disks:
    - {id: os, path: $demo/disks/os.img}
    - {id: data, path: $demo/disks/data.img}
  failoverTarget:
    local: {directory: $demo/recovered}
YAML

step "Registering the agent of $server with its single-use bootstrap token"
for _ in $(seq 1 60); do kubectl get secret "sr-bootstrap-$server-token" -n "$ns" >/dev/null 2>&1 && break; sleep 1; done
kubectl get secret "sr-bootstrap-$server-token" -n "$ns" -o jsonpath='{.data.ca\.crt}' | base64 -d >"$demo/registration-ca.crt"
token=$(kubectl get secret "sr-bootstrap-$server-token" -n "$ns" -o jsonpath='{.data.token}' | base64 -d)
rc=0
# `register` waits (up to a minute) while the operator is still creating the identity.
SR_BOOTSTRAP_TOKEN=$token "$bin/siterecovery-agent" register --url "https://localhost:$registration" \
  --ca "$demo/registration-ca.crt" --namespace "$ns" --server "$server" --hostname "$server.example.com" \
  --disk "os=$demo/disks/os.img" --disk "data=$demo/disks/data.img" --out "$demo/agent" || rc=$?
[ "$rc" = 0 ] || { echo "registration failed ($rc)"; exit 1; }
ps_port=$(wait_port process-servers siterecovery-process-server 9443)
# In a cluster the agent reaches the process server by its DNS name; here, by its loopback port.
python3 - "$demo/agent/agent.json" "$ps_port" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c["processServer"] = f"localhost:{sys.argv[2]}"
json.dump(c, open(sys.argv[1], "w"), indent=2)
PY
RUST_LOG=info "$bin/siterecovery-agent" run --config "$demo/agent/agent.json" >"$demo/agent.log" 2>&1 &
echo $! >"$demo/agent.pid"

step "Initial replication (kubectl get protectedserver $server)"
t1=$(date +%s)
for _ in $(seq 1 240); do
  line=$(kubectl get psrv "$server" -n "$ns" -o jsonpath='{.status.phase} {.status.initialSync.percent} {.status.progression}')
  printf '  %s\n' "$line"
  case "$line" in Protected*) break ;; esac
  sleep 1
done
kubectl get psrv "$server" -n "$ns" -o wide
initial=$(elapsed "$t1")

step "Writing 4 MiB on $server and waiting for the next recovery point"
before=$(kubectl get psrv "$server" -n "$ns" -o jsonpath='{.status.latestRecoveryPoints.crashConsistent.id}')
dd if=/dev/urandom of="$demo/disks/os.img" bs=1M count=4 seek=20 conv=notrunc status=none
sync
# A point id starts with its instant (UTC, yyyymmddThhmmss): wait for one taken in a later
# second than the write ended, so it holds the write (a point already on its way when the
# write began would not).
written=$(date -u +%Y%m%dT%H%M%S)
for _ in $(seq 1 60); do
  now=$(kubectl get psrv "$server" -n "$ns" -o jsonpath='{.status.latestRecoveryPoints.crashConsistent.id}')
  [[ "${now:0:15}" > "$written" ]] && break
  sleep 1
done
echo "  latest recovery point: $now (was ${before:-none}; the write ended at ${written}Z)"

step "Test failover of a RecoveryPlan (replication goes on)"
kubectl apply --server-side -n "$ns" -f - <<YAML >/dev/null
apiVersion: siterecovery.io/v1alpha1
kind: RecoveryPlan
metadata: {name: drill}
spec:
  groups:
    - {name: web, servers: [$server]}
YAML
wait_run() { # run id: until the plan reports that run finished
  local state=""
  for _ in $(seq 1 180); do
    state=$(kubectl get recoveryplan drill -n "$ns" -o jsonpath='{.status.operation.runId} {.status.operation.state} {.status.operation.progress}')
    case "$state" in "$1 Succeeded"*) echo "  run $1: Succeeded"; return 0 ;; "$1 Failed"*) echo "  run $1: $state"; return 1 ;; esac
    sleep 1
  done
  echo "  run $1 did not finish: $state"; return 1
}
t3=$(date +%s)
echo "  \$ kubectl siterecovery test-failover drill --run-id demo-1"
kubectl siterecovery test-failover drill -n "$ns" --run-id demo-1 --timeout 3m
wait_run demo-1
failover=$(elapsed "$t3")
point=$(kubectl get psrv "$server" -n "$ns" -o jsonpath='{.status.testFailover.recoveryPoint.id}')
echo "  recovered point $point into:"
kubectl get psrv "$server" -n "$ns" -o jsonpath='{range .status.testFailover.recoveredDisks[*]}{"    "}{@}{"\n"}{end}'
ok=yes
for d in os data; do
  if cmp -s "$demo/disks/$d.img" "$demo/recovered/test-failover/$server/$d.img"; then
    echo "  $d: identical to the source, byte for byte"
  else
    echo "  $d: DIFFERS from the source"; ok=no
  fi
done

step "Cleaning up the test failover"
echo "  \$ kubectl siterecovery cleanup drill --run-id demo-1-cleanup"
kubectl siterecovery cleanup drill -n "$ns" --run-id demo-1-cleanup --timeout 2m
wait_run demo-1-cleanup
ls "$demo/recovered/test-failover/$server" 2>/dev/null | sed 's/^/    left: /' || echo "  test disks removed"

step "Summary (kubectl siterecovery status; kubectl siterecovery points $server)"
kubectl siterecovery status -n "$ns"
kubectl siterecovery points "$server" -n "$ns" | head -n 6
cat <<MSG
  initial replication of 304 MiB (48 MiB data + sparse 256 MiB): $initial
  test failover (restore + verify): $failover, recovered disks identical to the source: $ok
  current RPO: $(kubectl get psrv "$server" -n "$ns" -o jsonpath='{.status.currentRpo}'), latest point: $(kubectl get psrv "$server" -n "$ns" -o jsonpath='{.status.latestRecoveryPoints.crashConsistent.id}')
  whole demo: $(elapsed "$t0")

Everything is still running. Explore:
  source target/cluster/env.sh
  kubectl get siterecovery -n $ns
  kubectl describe psrv $server -n $ns
  kubectl get events -n $ns --sort-by=.lastTimestamp
  export PATH=\$PWD/target/debug:\$PATH           # puts the kubectl plugin on PATH
  kubectl siterecovery status -n $ns
  kubectl siterecovery points $server -n $ns
  tail -f target/demo/agent.log target/demo/*-runner.log
Stop everything with:
  make demo-down
MSG
[ "$ok" = yes ]

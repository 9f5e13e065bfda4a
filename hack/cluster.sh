#!/usr/bin/env bash
# The embedded default's Kubernetes control plane: etcd + kube-apiserver (RBAC on,
# service-account signing keys, generated certificates) + kube-controller-manager,
# all on loopback, run as local processes from the binaries hack/build-controlplane.sh
# caches.
#
#   hack/cluster.sh up       start (idempotent: a healthy running cluster is kept)
#   hack/cluster.sh down     stop and remove all state (idempotent)
#   hack/cluster.sh status   exit 0 when the API answers /readyz
#
# Writes $SR_CLUSTER_DIR/admin.kubeconfig and $SR_CLUSTER_DIR/env.sh (KUBECONFIG, PATH).
# Ports can be moved with SR_ETCD_PORT and SR_APISERVER_PORT.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
SR_CACHE=${SR_CACHE:-$HOME/.cache/siterecovery}
SR_CLUSTER_DIR=${SR_CLUSTER_DIR:-$repo/target/cluster}
ETCD_PORT=${SR_ETCD_PORT:-23790}
ETCD_PEER_PORT=$((ETCD_PORT + 1))
API_PORT=${SR_APISERVER_PORT:-16443}
KCM_PORT=${SR_KCM_PORT:-16444}
bin="$SR_CACHE/bin"
d="$SR_CLUSTER_DIR"
pki="$d/pki"
logs="$d/logs"

log() { printf '[cluster] %s\n' "$*" >&2; }

pid_alive() { [ -f "$d/$1.pid" ] && kill -0 "$(cat "$d/$1.pid")" 2>/dev/null; }

fail_with_log() {
  log "$1 failed to start; last lines of $logs/$1.log:"
  tail -n 40 "$logs/$1.log" >&2 || true
  exit 1
}

ready() {
  curl -sf --max-time 3 --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
    "https://127.0.0.1:$API_PORT/readyz" >/dev/null 2>&1
}

gen_pki() {
  [ -f "$pki/.done" ] && return 0
  mkdir -p "$pki"
  log "generating certificates and service-account keys in $pki"
  (
    cd "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=siterecovery-local-ca" \
      -keyout ca.key -out ca.crt 2>/dev/null
    # rustls (kube-rs) accepts only X.509 v3, which `openssl x509 -req` writes only when
    # given extensions; so every certificate gets key usages.
    issue() { # name subject eku [san]
      openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$1.key" -out "$1.csr" 2>/dev/null
      {
        echo "basicConstraints=critical,CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment"
        echo "extendedKeyUsage=$3"
        [ -n "${4:-}" ] && echo "subjectAltName=$4"
      } >"$1.ext"
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
        -out "$1.crt" -extfile "$1.ext" 2>/dev/null
    }
    issue apiserver "/CN=kube-apiserver" serverAuth \
      "IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    issue admin "/O=system:masters/CN=siterecovery-admin" clientAuth
    issue controller-manager "/CN=system:kube-controller-manager" clientAuth
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    touch .done
  )
}

kubeconfig() { # file user
  cat >"$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority: $pki/ca.crt
users:
- name: $2
  user:
    client-certificate: $pki/$2.crt
    client-key: $pki/$2.key
contexts:
- name: local
  context: {cluster: local, user: $2}
current-context: local
KC
}

start_etcd() {
  pid_alive etcd && return 0
  log "starting etcd on 127.0.0.1:$ETCD_PORT"
  "$bin/etcd/etcd" --name local --data-dir "$d/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "local=http://127.0.0.1:$ETCD_PEER_PORT" \
    --unsafe-no-fsync --quota-backend-bytes 4294967296 --log-level warn \
    >"$logs/etcd.log" 2>&1 &
  echo $! >"$d/etcd.pid"
  for _ in $(seq 1 100); do
    curl -sf --max-time 2 "http://127.0.0.1:$ETCD_PORT/health" >/dev/null 2>&1 && return 0
    pid_alive etcd || fail_with_log etcd
    sleep 0.2
  done
  fail_with_log etcd
}

start_apiserver() {
  pid_alive kube-apiserver && return 0
  log "starting kube-apiserver on https://127.0.0.1:$API_PORT"
  "$bin/kube/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" \
    --authorization-mode RBAC \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --service-cluster-ip-range 10.0.0.0/24 \
    --allow-privileged=true \
    --enable-priority-and-fairness=false \
    --profiling=false \
    --v=1 \
    >"$logs/kube-apiserver.log" 2>&1 &
  echo $! >"$d/kube-apiserver.pid"
  for _ in $(seq 1 300); do
    ready && return 0
    pid_alive kube-apiserver || fail_with_log kube-apiserver
    sleep 0.2
  done
  fail_with_log kube-apiserver
}

start_controller_manager() {
  pid_alive kube-controller-manager && return 0
  log "starting kube-controller-manager"
  "$bin/kube/kube-controller-manager" \
    --kubeconfig "$d/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$d/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$d/controller-manager.kubeconfig" \
    --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
    --cluster-signing-cert-file "$pki/ca.crt" --cluster-signing-key-file "$pki/ca.key" \
    --use-service-account-credentials --leader-elect=false \
    --bind-address 127.0.0.1 --secure-port "$KCM_PORT" \
    --controllers '*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-service-lb-controller,-route,-persistentvolume-expander,-attachdetach' \
    --v=1 \
    >"$logs/kube-controller-manager.log" 2>&1 &
  echo $! >"$d/kube-controller-manager.pid"
  # Ready when it has created the default ServiceAccount of the default namespace.
  for _ in $(seq 1 300); do
    KUBECONFIG="$d/admin.kubeconfig" "$bin/kube/kubectl" get serviceaccount default -n default \
      >/dev/null 2>&1 && return 0
    pid_alive kube-controller-manager || fail_with_log kube-controller-manager
    sleep 0.2
  done
  fail_with_log kube-controller-manager
}

up() {
  for b in etcd/etcd kube/kube-apiserver kube/kube-controller-manager kube/kubectl; do
    [ -x "$bin/$b" ] || { log "missing $bin/$b: run hack/build-controlplane.sh (make tools)"; exit 1; }
  done
  if ready && pid_alive kube-controller-manager; then
    log "already running (KUBECONFIG=$d/admin.kubeconfig)"
    return 0
  fi
  mkdir -p "$d" "$logs"
  gen_pki
  kubeconfig "$d/admin.kubeconfig" admin
  kubeconfig "$d/controller-manager.kubeconfig" controller-manager
  cat >"$d/env.sh" <<ENV
# source this file to talk to the local control plane
export KUBECONFIG=$d/admin.kubeconfig
export PATH=$bin/kube:$bin/helm:\$PATH
export KUBECTL=$bin/kube/kubectl
ENV
  start_etcd
  start_apiserver
  start_controller_manager
  log "ready: $("$bin/kube/kubectl" --kubeconfig "$d/admin.kubeconfig" version -o json | sed -n 's/.*"gitVersion": "\(v[^"]*\)".*/\1/p' | tail -1) at https://127.0.0.1:$API_PORT"
  log "use it with: source $d/env.sh"
}

down() {
  for c in operator kube-controller-manager kube-apiserver etcd; do
    if pid_alive "$c"; then
      local pid; pid=$(cat "$d/$c.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
  rm -rf "$d"
  log "stopped and removed $d"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) ready ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac

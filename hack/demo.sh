#!/usr/bin/env bash
# `make demo`: builds what is needed, starts the local control plane (left running),
# installs the siterecovery.io CRDs, applies the examples and shows them with kubectl.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/.."
ns=siterecovery-demo
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "Installing tools and building (cached after the first run)"
"$here/tools.sh"
cargo build --workspace --bins

step "Starting the local control plane (etcd, kube-apiserver, kube-controller-manager)"
"$here/cluster.sh" up
# shellcheck disable=SC1091
source target/cluster/env.sh

step "Installing the CustomResourceDefinitions"
kubectl apply --server-side -f crds/
kubectl wait --for condition=Established --timeout=60s \
  crd/replicationpolicies.siterecovery.io crd/protectedservers.siterecovery.io \
  crd/recoveryplans.siterecovery.io crd/failbackjobs.siterecovery.io

step "Applying the examples into namespace $ns"
kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply --server-side -f -
kubectl apply --server-side -n "$ns" -f examples/

step "kubectl get siterecovery -n $ns"
kubectl get siterecovery -n "$ns"
step "kubectl get protectedservers -n $ns -o wide"
kubectl get protectedservers -n "$ns" -o wide

step "Admission rejects an invalid policy, naming the field"
kubectl apply --server-side -n "$ns" -f - <<'YAML' 2>&1 | sed 's/^/    /' || true
apiVersion: siterecovery.io/v1alpha1
kind: ReplicationPolicy
metadata: {name: too-slow}
spec:
  rpoThreshold: 15m
  crashConsistentInterval: 2h
  retention: {window: 24h}
  target:
    endpoint: https://contosodr.blob.core.windows.net
    container: dr-site
    credential: {secretRef: {name: storage}}
YAML

cat <<MSG

The control plane is still running. To explore:
  source target/cluster/env.sh
  kubectl get siterecovery -n $ns
  kubectl explain protectedserver.spec
  kubectl explain replicationpolicy.spec.retention
Stop it and remove its state with:
  make cluster-down
MSG

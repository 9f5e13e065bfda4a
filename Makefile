# The verbs people type. `make demo` and `make test` install what they need themselves
# (cached under $(SR_CACHE)) and are safe to run again.
SHELL := /bin/bash
export SR_CACHE ?= $(HOME)/.cache/siterecovery
CARGO ?= cargo

.PHONY: demo demo-down test bench tools build generate lint cluster-up cluster-down e2e unit help

help:
	@echo "make demo          end to end: control plane, Azurite, helm install, protect a server, test failover"
	@echo "make demo-down     stop everything make demo left running"
	@echo "make test          the whole suite: lint, unit tests, tests against a real local API server"
	@echo "make bench         release build, private control plane, operator scale benchmark (target/bench/)"
	@echo "make cluster-up    start etcd + kube-apiserver + kube-controller-manager on loopback"
	@echo "make cluster-down  stop them and remove their state"
	@echo "make generate      regenerate crds/ and the chart's CRDs from crates/api, and deploy/ from the chart"
	@echo "make lint          rustfmt, clippy (warnings are errors), generated files up to date"

demo:
	@hack/demo.sh

# Stops what `make demo` left running (agent, pod runners, Azurite, control plane).
demo-down:
	@hack/demo.sh down

test:
	@hack/test.sh

# Benchmarks (not part of `make test`): a private control plane, figures in target/bench/.
bench:
	@hack/bench.sh $(BENCH_ARGS)

# Toolchain components and the pinned control-plane binaries (built once, cached).
tools:
	@hack/tools.sh

build:
	$(CARGO) build --workspace --all-targets

generate:
	$(CARGO) run -q -p siterecovery-operator --bin crdgen -- --out crds --out charts/siterecovery/crds
	hack/render-deploy.sh

lint: tools
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) run -q -p siterecovery-operator --bin crdgen -- --check --out crds --out charts/siterecovery/crds

cluster-up: tools
	@hack/cluster.sh up

cluster-down:
	@hack/cluster.sh down

# Unit tests only (no cluster).
unit:
	$(CARGO) test --workspace --exclude siterecovery-e2e

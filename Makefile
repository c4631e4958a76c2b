# vimg: disk images as volume data sources on Kubernetes.
# `make demo` runs the main job; `make test` runs every test. See README.md.

SHELL := /usr/bin/env bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := build

GO          ?= go
VERSION     ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo devel)
LDFLAGS     := -s -w -X vimg.dev/vimg/pkg/version.Version=$(VERSION)
BIN         := bin
GO_TIMEOUT  ?= 45m

# Upstream binaries (etcd, kube-apiserver, kubectl, ...) are built from the Go
# module proxy into a cache outside the clone, keyed by version.
BUILD_BINARIES := tests/cluster/build-binaries.sh
export VIMG_K8S_BIN_DIR  ?= $(shell $(BUILD_BINARIES) --print-dir k8s)
export VIMG_ETCD_BIN_DIR ?= $(shell $(BUILD_BINARIES) --print-dir etcd)

# vimg decodes compressed qcow2 clusters with libdeflate through cgo, linked
# statically (Debian libdeflate-dev), and the binaries are static as a whole
# so that they run in any container image.
STATIC      := -tags netgo,osusergo -ldflags '$(LDFLAGS) -linkmode external -extldflags "-static"'

.PHONY: build
build: ## Build vimg's binaries into bin/ (static, with libdeflate)
	CGO_ENABLED=1 $(GO) build -trimpath $(STATIC) -o $(BIN)/ ./cmd/...

.PHONY: generate
generate: ## Regenerate deepcopy code and the CRDs in deploy/crds from the API types
	$(GO) tool controller-gen object paths=./pkg/apis/... \
		crd:crdVersions=v1 output:crd:artifacts:config=deploy/crds

.PHONY: verify-generate
verify-generate: generate ## Fail if generated files are stale
	@if [ -n "$$(git status --porcelain -- deploy/crds pkg/apis)" ]; then \
		git status --porcelain -- deploy/crds pkg/apis; git diff --stat -- deploy/crds pkg/apis; \
		echo "generated files are stale: run 'make generate' and commit the result" >&2; exit 1; \
	fi

.PHONY: lint
lint: ## gofmt and go vet
	@unformatted=$$(gofmt -l $$(git ls-files '*.go')); \
	if [ -n "$$unformatted" ]; then echo "gofmt would change: $$unformatted" >&2; exit 1; fi
	$(GO) vet ./...

.PHONY: k8s-binaries
k8s-binaries: ## Build etcd and the Kubernetes binaries into the cache (cold: ~12 min)
	$(BUILD_BINARIES) api

.PHONY: test-unit
test-unit: ## Unit tests only (no control plane)
	tests/run-go-tests.sh $$($(GO) list ./... | grep -v /tests/)

.PHONY: test-integration
test-integration: k8s-binaries ## API tests against a real etcd + kube-apiserver
	tests/run-go-tests.sh ./tests/integration/...

# `make test` runs each fuzz target for FUZZ_EXECS inputs. A count, not a
# duration: go1.26's coordinator can report a spurious "context deadline
# exceeded" when a -fuzztime duration expires mid-input (golang/go#75804,
# fixed in go1.27). Longer runs by hand: make fuzz FUZZTIME=10m
FUZZ_EXECS  ?= 50000x
FUZZTIME    ?= 10s

.PHONY: fuzz
fuzz: ## Run every go test -fuzz target for FUZZTIME (default 10s) each
	tests/run-fuzz.sh $(FUZZTIME) ./pkg/...

.PHONY: test
test: lint verify-generate build k8s-binaries ## Every test: lint, generated files, unit, integration, fuzz, e2e on a real cluster
	$(BIN)/vimg version -o json
	@$(BIN)/vimg version -o json | grep -q '"inflate": "libdeflate"' || { echo "bin/vimg was built without libdeflate" >&2; exit 1; }
	@$(BIN)/vimg version -o json | grep -q '"xz": "liblzma-mt"' || { echo "bin/vimg was built without liblzma" >&2; exit 1; }
	GO_TIMEOUT=$(GO_TIMEOUT) tests/run-go-tests.sh ./...
	tests/run-fuzz.sh $(FUZZ_EXECS) ./pkg/...
	tests/cluster/run-e2e.sh

.PHONY: cluster-up
cluster-up: ## Bring up the local single-node cluster (tests/cluster; cold: ~20 min, warm: < 1 min)
	tests/cluster/up.sh

.PHONY: cluster-down
cluster-down: ## Stop the local cluster and undo its changes to the machine
	tests/cluster/down.sh

.PHONY: cluster-status
cluster-status: ## Show the local cluster
	tests/cluster/status.sh

.PHONY: deploy
deploy: cluster-up ## Build our image, load it into the local cluster and apply deploy/ (kubectl apply -k)
	tests/cluster/deploy.sh

.PHONY: undeploy
undeploy: ## Delete every image, then everything deploy/ applied, from the local cluster
	tests/cluster/deploy.sh delete

.PHONY: e2e
e2e: ## e2e tests on the local cluster (brought up and down unless it is already up)
	tests/cluster/run-e2e.sh

.PHONY: bench
bench: build ## vimg convert vs qemu-img convert side by side (throughput, RSS, ratio)
	$(GO) run ./tests/bench -vimg $(BIN)/vimg

.PHONY: bench-dvcr
bench-dvcr: build ## push/pull of a 2 GiB disk file through DVCR (TLS, loopback) vs cp on the same disk
	$(GO) run ./tests/bench/dvcr -dvcr $(BIN)/dvcr

.PHONY: bench-csi
bench-csi: build ## CSI node publish: cold (1 GiB cache fill from DVCR) vs cp on the same disk, warm publish latency (needs root)
	$(GO) run ./tests/bench/csi -dvcr $(BIN)/dvcr

.PHONY: bench-populate
bench-populate: build ## HTTP qcow2 (2 GiB, zlib) → volume: vimg (through DVCR, and straight) vs download + qemu-img convert
	$(GO) run ./tests/bench/populate -dvcr $(BIN)/dvcr

.PHONY: bench-go
bench-go: ## Micro-benchmarks (go test -bench)
	$(GO) test -run '^$$' -bench . -benchmem ./pkg/...

.PHONY: demo
demo: cluster-up ## The main job, end to end: deploy vimg, import images over HTTP into DVCR, show them
	tests/cluster/demo.sh

.PHONY: clean
clean: ## Remove build output (the binary cache stays: see tests/cluster/build-binaries.sh)
	rm -rf $(BIN)

.PHONY: help
help: ## List the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

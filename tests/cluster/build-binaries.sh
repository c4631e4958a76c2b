#!/usr/bin/env bash
# Builds the upstream binaries the tests and the local cluster run, from the Go
# module proxy, into a cache OUTSIDE the clone keyed by version, so that a fresh
# clone on the same machine (CI) reuses them and a new machine builds them once.
#
#   tests/cluster/build-binaries.sh [api|cluster|k8s|etcd|provisioner|coredns]
#       api:     etcd + Kubernetes (what the API tests need)
#       cluster: everything the local cluster runs (the default)
#   tests/cluster/build-binaries.sh --print-dir k8s|etcd|provisioner|coredns
#       prints the bin dir, builds nothing
#
# Environment: VIMG_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/vimg),
# K8S_VERSION, ETCD_VERSION, PROVISIONER_VERSION, COREDNS_VERSION.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.34.1}
ETCD_VERSION=${ETCD_VERSION:-v3.6.5}
PROVISIONER_VERSION=${PROVISIONER_VERSION:-v5.3.0}
COREDNS_VERSION=${COREDNS_VERSION:-v1.14.7}
CACHE=${VIMG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vimg}
K8S_BINS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl kube-proxy)

k8s_dir() { echo "$CACHE/k8s-$K8S_VERSION/bin"; }
etcd_dir() { echo "$CACHE/etcd-$ETCD_VERSION/bin"; }
provisioner_dir() { echo "$CACHE/csi-provisioner-$PROVISIONER_VERSION/bin"; }
# CoreDNS's plugin chain, in order; the cache key follows it.
COREDNS_PLUGINS=(reload ready health errors cache hosts kubernetes template)
coredns_dir() { echo "$CACHE/coredns-$COREDNS_VERSION-$(echo "${COREDNS_PLUGINS[*]}" | sha256sum | cut -c1-8)/bin"; }

log() { echo "[build-binaries] $*" >&2; }

have_all() { # dir bin...
	local d=$1; shift
	for b in "$@"; do [ -x "$d/$b" ] || return 1; done
}

# cached_build LABEL OUT "BIN..." FUNC: unless OUT already holds every BIN,
# runs FUNC WORK, which leaves the binaries in WORK/bin, in a scratch folder;
# WORK/bin becomes OUT only when FUNC succeeded, so an interrupted build never
# leaves a half-filled cache.
cached_build() {
	local label=$1 out=$2 bins=$3 fn=$4
	# shellcheck disable=SC2086 # bins is a word list
	if have_all "$out" $bins; then log "$label: cached in $out"; return; fi
	local work; work=$(mktemp -d "$CACHE/.build.XXXXXX")
	log "$label: building $bins"
	mkdir -p "$work/bin"
	if ! "$fn" "$work"; then rm -rf "$work"; log "$label: build failed"; return 1; fi
	mkdir -p "$(dirname "$out")"
	rm -rf "$out" && mv "$work/bin" "$out" && rm -rf "$work"
	log "$label: built into $out"
}

# tools_module WORK PACKAGE...: a tools.go importing the packages, then
# go mod tidy on the go.mod the caller wrote into WORK.
tools_module() {
	local work=$1; shift
	{ echo '//go:build tools'; echo 'package vimgtoolbuild'; for p in "$@"; do echo "import _ \"$p\""; done; } >"$work/tools.go"
	(cd "$work" && go mod tidy >/dev/null)
}

# Kubernetes: one go build for all binaries (cold, separate builds take three
# times as long), with the version stamped as a release build stamps it.
k8s_build() {
	local work=$1
	local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
	local gomod
	gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^\s*"GoMod": "\(.*\)",$/\1/p')
	[ -f "$gomod" ] || { log "cannot find go.mod of k8s.io/kubernetes@$K8S_VERSION"; return 1; }
	{
		printf 'module vimgtoolbuild\n\ngo 1.24\n\nrequire k8s.io/kubernetes %s\n\n' "$K8S_VERSION"
		# k8s.io/kubernetes replaces its staging repos with ./staging paths that do
		# not exist in the module zip: point them at the published versions.
		grep -E '^\s*k8s.io/[a-z0-9-]+ => ./staging' "$gomod" |
			awk -v v="v0.${K8S_VERSION#v1.}" '{print "replace " $1 " => " $1 " " v}'
	} >"$work/go.mod"
	local pkgs=(); for b in "${K8S_BINS[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
	tools_module "$work" "${pkgs[@]}" || return 1
	local X=k8s.io/component-base/version Y=k8s.io/client-go/pkg/version
	local ldf="-s -w -X $X.gitVersion=$K8S_VERSION -X $X.gitMajor=1 -X $X.gitMinor=$minor -X $X.gitTreeState=clean"
	ldf="$ldf -X $Y.gitVersion=$K8S_VERSION -X $Y.gitMajor=1 -X $Y.gitMinor=$minor"
	(cd "$work" && CGO_ENABLED=0 go build -trimpath -ldflags "$ldf" -o "$work/bin/" "${pkgs[@]}")
}

etcd_build() {
	local work=$1
	printf 'module vimgtoolbuild\n\ngo 1.24\n\nrequire (\n\tgo.etcd.io/etcd/server/v3 %s\n\tgo.etcd.io/etcd/etcdctl/v3 %s\n)\n' \
		"$ETCD_VERSION" "$ETCD_VERSION" >"$work/go.mod"
	tools_module "$work" go.etcd.io/etcd/server/v3 go.etcd.io/etcd/etcdctl/v3 || return 1
	(cd "$work" && CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o "$work/bin/etcd" go.etcd.io/etcd/server/v3 &&
		CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o "$work/bin/etcdctl" go.etcd.io/etcd/etcdctl/v3)
}

# The external-provisioner sidecar: its go.mod has replace directives, so
# `go install pkg@version` refuses it; build a writable copy of the module.
provisioner_build() {
	local work=$1 src
	src=$(go mod download -json "github.com/kubernetes-csi/external-provisioner/v5@$PROVISIONER_VERSION" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')
	[ -d "$src" ] || { log "cannot download external-provisioner $PROVISIONER_VERSION"; return 1; }
	cp -r "$src" "$work/src" && chmod -R u+w "$work/src"
	(cd "$work/src" && CGO_ENABLED=0 go build -mod=mod -trimpath -ldflags "-s -w -X main.version=$PROVISIONER_VERSION" \
		-o "$work/bin/csi-provisioner" ./cmd/csi-provisioner)
}

# CoreDNS with only the plugins manifests/coredns.yaml's Corefile uses, in
# the order of COREDNS_PLUGINS (the chain a query runs through: template,
# last, answers NXDOMAIN for any name no plugin before it knows, as real DNS
# does for a name that does not exist). The stock binary compiles every
# plugin (cloud DNS SDKs included) and takes several times as long to build.
coredns_build() {
	local work=$1 p imports="" directives=""
	for p in "${COREDNS_PLUGINS[@]}"; do
		imports+=$'\t_ "github.com/coredns/coredns/plugin/'"$p"$'"\n'
		directives+="\"$p\", "
	done
	printf 'module vimgcoredns\n\ngo 1.24\n\nrequire github.com/coredns/coredns %s\n' "$COREDNS_VERSION" >"$work/go.mod"
	cat >"$work/main.go" <<GO
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"
$imports)

func init() {
	dnsserver.Directives = []string{${directives%, }}
}

func main() { coremain.Run() }
GO
	(cd "$work" && gofmt -w main.go && go mod tidy >/dev/null && CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o "$work/bin/coredns" .)
}

build_k8s() { cached_build "kubernetes $K8S_VERSION (cold: ~11 min)" "$(k8s_dir)" "${K8S_BINS[*]}" k8s_build; }
build_etcd() { cached_build "etcd $ETCD_VERSION (cold: ~2 min)" "$(etcd_dir)" "etcd etcdctl" etcd_build; }
build_provisioner() { cached_build "csi-provisioner $PROVISIONER_VERSION (cold: ~3.5 min)" "$(provisioner_dir)" csi-provisioner provisioner_build; }
build_coredns() { cached_build "coredns $COREDNS_VERSION (cold: ~2.5 min)" "$(coredns_dir)" coredns coredns_build; }

if [ "${1:-}" = "--print-dir" ]; then
	case "${2:-}" in
	k8s) k8s_dir ;; etcd) etcd_dir ;; provisioner) provisioner_dir ;; coredns) coredns_dir ;;
	*) echo "usage: $0 --print-dir k8s|etcd|provisioner|coredns" >&2; exit 2 ;;
	esac
	exit 0
fi

mkdir -p "$CACHE"
case "${1:-cluster}" in
k8s) build_k8s ;;
etcd) build_etcd ;;
provisioner) build_provisioner ;;
coredns) build_coredns ;;
api) build_etcd; build_k8s ;;
cluster | all) build_etcd; build_k8s; build_provisioner; build_coredns ;;
*) echo "usage: $0 [api|cluster|k8s|etcd|provisioner|coredns]" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Builds the upstream binaries the tests and the local cluster run, from the Go
# module proxy, into a cache OUTSIDE the clone keyed by version, so that a fresh
# clone on the same machine (CI) reuses them and a new machine builds them once.
#
#   tests/cluster/build-binaries.sh [k8s|etcd|all]   (default: all)
#   tests/cluster/build-binaries.sh --print-dir k8s  (prints the bin dir, builds nothing)
#
# Environment: VIMG_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/vimg),
# K8S_VERSION, ETCD_VERSION.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.34.1}
ETCD_VERSION=${ETCD_VERSION:-v3.6.5}
CACHE=${VIMG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vimg}
K8S_BINS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl)

k8s_dir() { echo "$CACHE/k8s-$K8S_VERSION/bin"; }
etcd_dir() { echo "$CACHE/etcd-$ETCD_VERSION/bin"; }

log() { echo "[build-binaries] $*" >&2; }

have_all() { # dir bin...
	local d=$1; shift
	for b in "$@"; do [ -x "$d/$b" ] || return 1; done
}

# Everything is built in a scratch module and moved into place only when the
# whole set succeeded, so an interrupted build never leaves a half-filled cache.
build_k8s() {
	local out; out=$(k8s_dir)
	if have_all "$out" "${K8S_BINS[@]}"; then log "kubernetes $K8S_VERSION: cached in $out"; return; fi
	local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
	local staging="v0.${K8S_VERSION#v1.}"
	local work; work=$(mktemp -d "$CACHE/.k8s-build.XXXXXX")
	trap 'rm -rf "$work"' RETURN
	log "kubernetes $K8S_VERSION: building ${K8S_BINS[*]} (cold: ~12 min on 2 cores)"
	local gomod
	gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^\s*"GoMod": "\(.*\)",$/\1/p')
	[ -f "$gomod" ] || { log "cannot find go.mod of k8s.io/kubernetes@$K8S_VERSION"; return 1; }
	{
		printf 'module vimgk8sbuild\n\ngo 1.24\n\nrequire k8s.io/kubernetes %s\n\n' "$K8S_VERSION"
		# k8s.io/kubernetes replaces its staging repos with ./staging paths that do
		# not exist in the module zip: point them at the published versions.
		grep -E '^\s*k8s.io/[a-z0-9-]+ => ./staging' "$gomod" |
			awk -v v="$staging" '{print "replace " $1 " => " $1 " " v}'
	} >"$work/go.mod"
	{
		echo '//go:build tools'
		echo 'package vimgk8sbuild'
		echo 'import ('
		for b in "${K8S_BINS[@]}"; do echo "	_ \"k8s.io/kubernetes/cmd/$b\""; done
		echo ')'
	} >"$work/tools.go"
	(cd "$work" && go mod tidy >/dev/null)
	local X=k8s.io/component-base/version Y=k8s.io/client-go/pkg/version
	local ldf="-s -w -X $X.gitVersion=$K8S_VERSION -X $X.gitMajor=1 -X $X.gitMinor=$minor -X $X.gitTreeState=clean"
	ldf="$ldf -X $Y.gitVersion=$K8S_VERSION -X $Y.gitMajor=1 -X $Y.gitMinor=$minor"
	mkdir -p "$work/bin"
	local pkgs=(); for b in "${K8S_BINS[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
	# One go build for all five: separate cold builds take three times as long.
	(cd "$work" && CGO_ENABLED=0 go build -trimpath -ldflags "$ldf" -o "$work/bin/" "${pkgs[@]}")
	mkdir -p "$(dirname "$out")"
	rm -rf "$out" && mv "$work/bin" "$out"
	log "kubernetes $K8S_VERSION: built into $out"
}

build_etcd() {
	local out; out=$(etcd_dir)
	if have_all "$out" etcd etcdctl; then log "etcd $ETCD_VERSION: cached in $out"; return; fi
	local work; work=$(mktemp -d "$CACHE/.etcd-build.XXXXXX")
	trap 'rm -rf "$work"' RETURN
	log "etcd $ETCD_VERSION: building etcd, etcdctl (cold: ~1 min)"
	printf 'module vimgetcdbuild\n\ngo 1.24\n\nrequire (\n\tgo.etcd.io/etcd/server/v3 %s\n\tgo.etcd.io/etcd/etcdctl/v3 %s\n)\n' \
		"$ETCD_VERSION" "$ETCD_VERSION" >"$work/go.mod"
	printf '//go:build tools\npackage vimgetcdbuild\nimport (\n\t_ "go.etcd.io/etcd/server/v3"\n\t_ "go.etcd.io/etcd/etcdctl/v3"\n)\n' >"$work/tools.go"
	(cd "$work" && go mod tidy >/dev/null)
	mkdir -p "$work/bin"
	(cd "$work" && CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o "$work/bin/etcd" go.etcd.io/etcd/server/v3 &&
		CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o "$work/bin/etcdctl" go.etcd.io/etcd/etcdctl/v3)
	mkdir -p "$(dirname "$out")"
	rm -rf "$out" && mv "$work/bin" "$out"
	log "etcd $ETCD_VERSION: built into $out"
}

if [ "${1:-}" = "--print-dir" ]; then
	case "${2:-}" in
	k8s) k8s_dir ;; etcd) etcd_dir ;;
	*) echo "usage: $0 --print-dir k8s|etcd" >&2; exit 2 ;;
	esac
	exit 0
fi

mkdir -p "$CACHE"
case "${1:-all}" in
k8s) build_k8s ;;
etcd) build_etcd ;;
all) build_etcd; build_k8s ;;
*) echo "usage: $0 [k8s|etcd|all]" >&2; exit 2 ;;
esac

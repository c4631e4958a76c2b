#!/usr/bin/env bash
# Runs every `go test -fuzz` target in the given packages for a budget each
# (first argument: a count such as 50000x, or a duration such as 10m), after
# its seed corpus. With a count, -timeout bounds a hanging input; with a
# duration, the duration does. New inputs are
# minimized for at most 3 s (the default, 60 s, would eat a short run). A
# failure stops the run; go test leaves the failing input in the package's
# testdata/fuzz.
set -euo pipefail
fuzztime=$1
shift
timeout=0
case $fuzztime in *x) timeout=15m ;; esac
ran=0
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for pkg in $(go list "$@"); do
	targets=$(go test -list '^Fuzz' "$pkg" | grep '^Fuzz' || true)
	for target in $targets; do
		echo "fuzz: $pkg $target for $fuzztime"
		if ! go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" -fuzzminimizetime 3s -timeout $timeout "$pkg" >"$log" 2>&1; then
			cat "$log"
			echo "fuzz: $target in $pkg failed" >&2
			exit 1
		fi
		tail -n 2 "$log"
		ran=$((ran + 1))
	done
done
if [ "$ran" -eq 0 ]; then
	echo "fuzz: no fuzz targets found in $*" >&2
	exit 1
fi
echo "fuzz: $ran targets ran for $fuzztime each, no failures"

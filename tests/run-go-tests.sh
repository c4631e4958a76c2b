#!/usr/bin/env bash
# Runs `go test -v` on the given packages, ends with one summary line
# ("tests: N passed, N failed, N skipped"), and in CI (CI set) fails when any
# test skipped: CI provides everything the tests need, so a skip there means a
# missing prerequisite, never something to pass over silently.
set -uo pipefail
log=$(mktemp)
trap 'rm -f "$log"' EXIT
go test -count=1 -timeout "${GO_TIMEOUT:-45m}" ${GO_TEST_TAGS:+-tags "$GO_TEST_TAGS"} -v "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
passed=$(grep -cE '^\s*--- PASS' "$log")
failed=$(grep -cE '^\s*--- FAIL' "$log")
skipped=$(grep -cE '^\s*--- SKIP' "$log")
if [ "$skipped" -gt 0 ]; then
	echo "skipped tests, with their reasons:"
	grep -A1 -E '^\s*--- SKIP' "$log" | grep -v '^--$'
	if [ -n "${CI:-}" ]; then
		echo "CI: $skipped test(s) skipped; in CI nothing may skip" >&2
		rc=1
	fi
fi
if [ "$failed" -gt 0 ]; then
	# The log is long and CI may show only its tail: name the failures last.
	# Each with the lines it logged (go test -v indents them under it).
	echo "failed tests:"
	awk '/^[[:space:]]*--- FAIL/ {show = 1; n = 0; print; next}
		/^[[:space:]]*(---|===) / || /^(ok|FAIL|PASS)/ {show = 0}
		show && n++ < 30' "$log"
	grep -E '^FAIL[[:space:]]' "$log"
fi
echo "tests: $passed passed, $failed failed, $skipped skipped"
exit "$rc"

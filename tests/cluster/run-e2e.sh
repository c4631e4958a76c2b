#!/usr/bin/env bash
# Runs the e2e tests on the local cluster. A cluster that is already up is
# reused and left up; otherwise this brings one up, and afterwards down again
# and checks that it left nothing behind on the machine.
set -uo pipefail
source "$(dirname "$0")/lib.sh"

reuse=0
if cluster_up; then
	reuse=1
	log "reusing the running cluster"
else
	"$HERE/up.sh" || { log "cluster-up failed; logs in $LOGS"; "$HERE/down.sh"; exit 1; }
fi

cd "$REPO"
# vimg itself, deployed the way an installation is (kubectl apply -k deploy).
if ! "$HERE/deploy.sh"; then
	log "deploying vimg failed"
	[ "$reuse" = 0 ] && "$HERE/down.sh"
	exit 1
fi
GO_TEST_TAGS=e2e "$REPO/tests/run-go-tests.sh" ./tests/e2e/...
rc=$?

if [ "$reuse" = 0 ]; then
	"$HERE/down.sh" || rc=1
	"$HERE/check-clean.sh" || rc=1
fi
exit "$rc"

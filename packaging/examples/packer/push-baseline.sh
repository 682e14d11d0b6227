#!/bin/sh
# Registers an image's signed baseline with the collector: run on the BUILD HOST (Packer's
# shell-local provisioner) after provision.sh made the baseline inside the image and the build
# downloaded it. The collector checks the signature against its trusted_keys and refuses a
# version that is not newer than the one registered for the image.
#
# usage: push-baseline.sh BASELINE.dwb
# Environment (from the build environment's secret store, never from the template):
#   DRIFTWATCH_API        the collector's HTTP API, e.g. https://collector.example.com:7480
#   DRIFTWATCH_TOKEN      an admin API token (dwa_…), or DRIFTWATCH_TOKEN_FILE: a file holding it
#   DRIFTWATCH_CA_FILE    the CA to trust for an https:// API (optional on loopback http)
# Needs the `driftwatch` CLI (driftwatch-collector package, or the binary) on PATH.
set -eu

die() {
    echo "push-baseline.sh: $*" >&2
    exit 1
}

[ $# = 1 ] || die "usage: push-baseline.sh BASELINE.dwb"
baseline=$1
[ -f "$baseline" ] || die "no baseline file $baseline"
[ -n "${DRIFTWATCH_API:-}" ] || die "DRIFTWATCH_API is not set (the collector's HTTP API URL)"
command -v driftwatch >/dev/null || die "the driftwatch CLI is not on PATH"

if [ -n "${DRIFTWATCH_TOKEN_FILE:-}" ]; then
    set -- --token-file "$DRIFTWATCH_TOKEN_FILE"
elif [ -n "${DRIFTWATCH_TOKEN:-}" ]; then
    # driftwatch reads DRIFTWATCH_TOKEN itself: the token stays out of the process list.
    set --
else
    die "set DRIFTWATCH_TOKEN or DRIFTWATCH_TOKEN_FILE (an admin API token)"
fi
driftwatch "$@" baseline push "$baseline"

#!/usr/bin/env bash
# Checks the systemd units in packaging/systemd/:
#   - `systemd-analyze verify` prints nothing on stderr (any line is a failure);
#   - `systemd-analyze security --offline=yes` exposure is at most the limit of each unit
#     (driftwatch-agent 2.5, driftwatch-collector 2.0).
# verify needs the ExecStart= programs to exist, so it runs on a copy of each unit whose
# /usr/bin/driftwatch-* paths point at stand-ins in a temporary directory; nothing else is
# changed. (The package test verifies the installed units as they are, man pages included.)
#
# Without systemd-analyze the check skips with a reason; with CI=true a skip is a failure.
set -euo pipefail
cd "$(dirname "$0")/systemd"

declare -A limit=([driftwatch-agent.service]=2.5 [driftwatch-collector.service]=2.0)

if ! command -v systemd-analyze >/dev/null; then
  if [ "${CI:-}" = true ] || [ "${CI:-}" = 1 ]; then
    echo "check-units: systemd-analyze is missing and CI=true forbids skipping" >&2
    exit 1
  fi
  echo "check-units: SKIPPED: systemd-analyze is not installed (apt-get install systemd)" >&2
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/bin"
for b in driftwatch-agent driftwatch-collector; do
  printf '#!/bin/sh\nexit 0\n' >"$tmp/bin/$b"
  chmod 0755 "$tmp/bin/$b"
done

status=0
for unit in "${!limit[@]}"; do
  [ -f "$unit" ] || { echo "check-units: $unit is missing" >&2; status=1; continue; }
  sed "s|/usr/bin/driftwatch-|$tmp/bin/driftwatch-|g" "$unit" >"$tmp/$unit"

  if ! systemd-analyze verify --man=no "$tmp/$unit" 2>"$tmp/verify.err" >/dev/null \
      || [ -s "$tmp/verify.err" ]; then
    echo "check-units: FAIL: systemd-analyze verify $unit:" >&2
    sed "s|$tmp/bin/|/usr/bin/|g; s|^|  |" "$tmp/verify.err" >&2
    status=1
  else
    echo "check-units: ok: systemd-analyze verify $unit: no warnings"
  fi

  out=$(systemd-analyze security --offline=yes --no-pager "$tmp/$unit" 2>"$tmp/security.err" || true)
  if [ -s "$tmp/security.err" ]; then
    echo "check-units: FAIL: systemd-analyze security $unit wrote to stderr:" >&2
    sed 's/^/  /' "$tmp/security.err" >&2
    status=1
  fi
  exposure=$(printf '%s\n' "$out" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
  if [ -z "$exposure" ]; then
    echo "check-units: FAIL: no exposure level for $unit in:" >&2
    printf '%s\n' "$out" | tail -5 >&2
    status=1
  elif awk -v e="$exposure" -v l="${limit[$unit]}" 'BEGIN { exit !(e > l) }'; then
    echo "check-units: FAIL: $unit exposure $exposure is above ${limit[$unit]}:" >&2
    printf '%s\n' "$out" | grep '✗' >&2 || true
    status=1
  else
    echo "check-units: ok: $unit exposure $exposure (limit ${limit[$unit]})"
  fi
done
exit $status

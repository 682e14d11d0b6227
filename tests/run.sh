#!/usr/bin/env bash
# Runs driftwatch's whole test suite: unit tests, then end-to-end tests of the real binaries
# on real Debian root filesystems (debootstrap, cached in /var/cache/driftwatch-tests), and the
# collector against real SQLite and PostgreSQL databases.
#
# On Debian it first installs the system packages the tests use (with sudo when not root).
# Tests that need root skip with a printed reason when not run as root; with CI=true a skip
# is a failure. Extra arguments go to `cargo test` (e.g. `tests/run.sh --test hostile`).
#
# Also: the systemd unit checks (packaging/check-units.sh), and cargo-deb for the package
# test (tests/tests/package.rs builds the real .debs and installs them on a booted container).
set -euo pipefail
cd "$(dirname "$0")/.."

# postgresql: the storage conformance suite and the collector's end-to-end tests start their own
# PostgreSQL server (initdb + pg_ctl in a temp dir); the packaged cluster is not used.
# systemd-container: systemd-nspawn for the booted servers of the package test; systemd:
# systemd-analyze for the unit checks; iproute2: the bridge, namespaces and veth links of the
# fleet test (tests/tests/nspawn_fleet.rs).
packages=(debootstrap util-linux mount ca-certificates dpkg-dev debsums rpm db5.3-util postgresql
  systemd systemd-container procps iproute2)
if command -v dpkg-query >/dev/null; then
  missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    sudo=()
    [ "$(id -u)" = 0 ] || sudo=(sudo)
    echo "installing test dependencies: ${missing[*]}" >&2
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
fi

# cargo-deb builds the Debian packages the package test installs (from crates.io, once).
if ! command -v cargo-deb >/dev/null; then
  echo "installing cargo-deb (cargo install --locked)" >&2
  cargo install cargo-deb --locked --quiet
fi

echo "== systemd units (packaging/check-units.sh)" >&2
bash packaging/check-units.sh

exec cargo test --workspace "$@"

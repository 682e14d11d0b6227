#!/usr/bin/env bash
# Runs driftwatch's whole test suite: unit tests, then end-to-end tests of the real binaries
# on real Debian root filesystems (debootstrap, cached in /var/cache/driftwatch-tests), and the
# collector against real SQLite and PostgreSQL databases.
#
# On Debian it first installs the system packages the tests use (with sudo when not root).
# Tests that need root skip with a printed reason when not run as root; with CI=true a skip
# is a failure. Extra arguments go to `cargo test` (e.g. `tests/run.sh --test hostile`).
#
# Also: the systemd unit checks (packaging/check-units.sh), and cargo-deb and cargo-generate-rpm
# for the package tests (tests/tests/package.rs, rpm_package.rs build the real packages and
# install them on a booted container).
set -euo pipefail
cd "$(dirname "$0")/.."

# postgresql: the storage conformance suite and the collector's end-to-end tests start their own
# PostgreSQL server (initdb + pg_ctl in a temp dir); the packaged cluster is not used.
# systemd-container: systemd-nspawn for the booted servers of the package test; systemd:
# systemd-analyze for the unit checks; iproute2: the bridge, namespaces and veth links of the
# fleet test (tests/tests/nspawn_fleet.rs). rpm: rpmbuild and the rpmdb test, and the RPM package
# test's queries; binutils: strip, for the RPMs (packaging/build.sh).
packages=(debootstrap util-linux mount ca-certificates dpkg-dev debsums rpm db5.3-util postgresql
  systemd systemd-container procps iproute2 binutils)
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

# cargo-deb and cargo-generate-rpm build the packages the package tests install (from
# crates.io, once).
for tool in cargo-deb cargo-generate-rpm; do
  if ! command -v $tool >/dev/null; then
    echo "installing $tool (cargo install --locked)" >&2
    cargo install $tool --locked --quiet
  fi
done

# The agent's dpkg unit test reads the cached Debian root but cannot depend on the tests crate
# that builds it (debootstrap, as root): build it first, so a fresh machine does not depend on
# which test binary runs first.
if [ "$(id -u)" = 0 ]; then
  echo "== Debian test root (cargo run -p driftwatch-tests --bin debian-root)" >&2
  cargo run --quiet -p driftwatch-tests --bin debian-root
fi

echo "== systemd units (packaging/check-units.sh)" >&2
bash packaging/check-units.sh

exec cargo test --workspace "$@"

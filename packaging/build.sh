#!/usr/bin/env bash
# Builds the driftwatch packages into target/packages/ (or --out DIR):
#   driftwatch-agent_<v>_<arch>.deb, driftwatch-collector_<v>_<arch>.deb (cargo-deb)
#   driftwatch-agent-<v>.<arch>.rpm, driftwatch-collector-<v>.<arch>.rpm (cargo-generate-rpm)
# First the binaries, then the man pages and shell completions generated from their clap
# definitions (packaging/gen, `driftwatch-gen`), which the packages install.
#
# usage: packaging/build.sh [--profile release|dev] [--version VERSION] [--out DIR] [--deb-only] [--fast]
#   --version  package version instead of the workspace's (e.g. 0.1.1~test for an upgrade test)
#   --fast     quicker, lighter compression (tests)
# Needs: cargo install cargo-deb cargo-generate-rpm --locked
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

profile=release version= out= rpm=1 fast=0
while (($#)); do
  case $1 in
    --profile) profile=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --deb-only) rpm=0; shift ;;
    --fast) fast=1; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
target=${CARGO_TARGET_DIR:-$root/target}
case $profile in
  release) pdir=$target/release ;;
  dev|debug) profile=dev; pdir=$target/debug ;;
  *) pdir=$target/$profile ;;
esac
out=${out:-$target/packages}
mkdir -p "$out"

for tool in cargo-deb cargo-generate-rpm; do
  if [ $tool = cargo-generate-rpm ] && [ $rpm = 0 ]; then continue; fi
  command -v $tool >/dev/null || {
    echo "build.sh: $tool is missing: cargo install $tool --locked" >&2
    exit 1
  }
done

echo "== binaries ($profile)"
cargo build --profile "$profile" -p driftwatch-agent -p driftwatch-collector -p driftwatch-packaging --bins

echo "== man pages and completions"
rm -rf "$pdir/generated"
"$pdir/driftwatch-gen" "$pdir/generated"

echo "== Debian packages"
deb_args=(--no-build --profile "$profile" --output "$out")
[ -n "$version" ] && deb_args+=(--deb-version "$version")
[ $fast = 1 ] && deb_args+=(--fast)
for p in driftwatch-agent driftwatch-collector; do
  cargo deb -p "$p" "${deb_args[@]}"
done

if [ $rpm = 1 ]; then
  echo "== RPM packages"
  rpm_args=(--profile "$profile" --target-dir "$target" -o "$out")
  [ -n "$version" ] && rpm_args+=(--set-metadata "version = \"${version//[~-]/_}\"")
  for p in driftwatch-agent driftwatch-collector; do
    cargo generate-rpm -p "${p#driftwatch-}" "${rpm_args[@]}"   # -p takes the crate directory
  done
fi
echo "== packages in $out"
ls -l "$out"

#!/usr/bin/env bash
# Builds the driftwatch packages into target/packages/ (or --out DIR):
#   driftwatch-agent_<v>_<arch>.deb, driftwatch-collector_<v>_<arch>.deb (cargo-deb)
#   driftwatch-agent-<v>.<arch>.rpm, driftwatch-collector-<v>.<arch>.rpm (cargo-generate-rpm)
# First the binaries, then the man pages and shell completions generated from their clap
# definitions (packaging/gen, `driftwatch-gen`), which the packages install.
#
# usage: packaging/build.sh [--profile release|dev] [--version VERSION] [--out DIR] [--deb-only|--rpm-only] [--fast] [--no-build]
#   --version  package version instead of the workspace's (e.g. 0.1.1~test for an upgrade test)
#   --no-build package the binaries of an earlier run as they are (e.g. a second version)
#   --fast     quicker, lighter compression (tests; gzip instead of zstd in the RPMs)
# Needs: cargo install cargo-deb cargo-generate-rpm --locked; strip (binutils) for the RPMs
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

profile=release version='' out='' deb=1 rpm=1 fast=0 build=1
while (($#)); do
  case $1 in
    --profile) profile=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --deb-only) rpm=0; shift ;;
    --rpm-only) deb=0; shift ;;
    --fast) fast=1; shift ;;
    --no-build) build=0; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
target=${CARGO_TARGET_DIR:-$root/target}
# Under cargo (a test), the same cargo binary as the harness, so both builds see one toolchain
# and environment and do not rebuild each other's dependencies.
cargo=${CARGO:-cargo}
case $profile in
  release) pdir=$target/release ;;
  dev|debug) profile=dev; pdir=$target/debug ;;
  *) pdir=$target/$profile ;;
esac
out=${out:-$target/packages}
mkdir -p "$out"

for tool in cargo-deb cargo-generate-rpm; do
  if [ $tool = cargo-generate-rpm ] && [ $rpm = 0 ]; then continue; fi
  if [ $tool = cargo-deb ] && [ $deb = 0 ]; then continue; fi
  command -v $tool >/dev/null || {
    echo "build.sh: $tool is missing: cargo install $tool --locked" >&2
    exit 1
  }
done

if [ $build = 1 ]; then
  echo "== binaries ($profile)"
  # The same selection as the test harness (tests/src/lib.rs): another set of packages unifies
  # dependency features differently, and the two builds would keep rebuilding each other.
  "$cargo" build --profile "$profile" --workspace --bins
fi
for b in driftwatch-agent driftwatch-collector driftwatch driftwatch-gen; do
  [ -x "$pdir/$b" ] || { echo "build.sh: no $pdir/$b (run without --no-build)" >&2; exit 1; }
done

echo "== man pages and completions"
rm -rf "$pdir/generated"
"$pdir/driftwatch-gen" "$pdir/generated"

if [ $deb = 1 ]; then
  echo "== Debian packages"
  deb_args=(--no-build --profile "$profile" --output "$out")
  [ -n "$version" ] && deb_args+=(--deb-version "$version")
  [ $fast = 1 ] && deb_args+=(--fast)
  for p in driftwatch-agent driftwatch-collector; do
    "$cargo" deb -p "$p" "${deb_args[@]}"
  done
fi

if [ $rpm = 1 ]; then
  echo "== RPM packages"
  # cargo-generate-rpm packs what it is given (cargo-deb strips by itself): the RPM metadata
  # names copies without debug info in $pdir/stripped/. Unstripped, a dev binary is ~200 MB
  # and its zstd payload took minutes per package; debug info belongs in a -debuginfo
  # package, not on every fleet node.
  rm -rf "$pdir/stripped"
  mkdir -p "$pdir/stripped"
  for b in driftwatch-agent driftwatch-collector driftwatch; do
    strip --strip-debug -o "$pdir/stripped/$b" "$pdir/$b"
  done
  rpm_args=(--profile "$profile" --target-dir "$target" -o "$out")
  [ $fast = 1 ] && rpm_args+=(--payload-compress gzip)
  [ -n "$version" ] && rpm_args+=(--set-metadata "version = \"${version//[~-]/_}\"")
  for p in driftwatch-agent driftwatch-collector; do
    "$cargo" generate-rpm -p "${p#driftwatch-}" "${rpm_args[@]}"   # -p takes the crate directory
  done
fi
echo "== packages in $out"
ls -l "$out"

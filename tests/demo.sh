#!/usr/bin/env bash
# driftwatch demo: sign a baseline of a real tree, let it drift, catch the drift.
#
# The "image" is a copy of real system directories of this machine (/etc, /usr/bin, /usr/sbin),
# so the demo needs no root and no network. Everything happens in a temporary directory that is
# removed at the end (KEEP=1 keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "building driftwatch-agent (release)"
cargo build --release --quiet -p driftwatch-agent
dw=$PWD/target/release/driftwatch-agent

work=$(mktemp -d /var/tmp/driftwatch-demo.XXXXXX)
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$work"' EXIT
img=$work/image
mkdir -p "$img/usr"
step "making an image root in $img from this machine's /etc, /usr/bin and /usr/sbin"
cp -a /etc "$img/" 2>/dev/null || true     # unreadable files (shadow) are skipped without root
cp -a /usr/bin /usr/sbin "$img/usr/"
echo "$(find "$img" | wc -l) objects, $(du -sh "$img" | cut -f1)"

step "image pipeline: a signing key, then the signed baseline of the image"
"$dw" keygen --out "$work/pipeline"
"$dw" baseline create --root "$img" --image-id demo-web --image-version 2026.11.1 \
  --expires 90d --sign-key "$work/pipeline.key" --out "$work/baseline.dwb"
"$dw" baseline verify "$work/baseline.dwb" --trusted-key "$work/pipeline.pub"
"$dw" baseline show "$work/baseline.dwb" --trusted-key "$work/pipeline.pub"

step "test server: the untouched image checks clean (exit 0)"
sleep 2  # let the copy age past the scan cache's 2 s racy window, so the cache can trust it
"$dw" check --baseline "$work/baseline.dwb" --trusted-key "$work/pipeline.pub" \
  --root "$img" --state-dir "$work/state" && echo "exit status 0"

step "production: someone fixes things by hand"
some_bin=$(find "$img/usr/bin" -maxdepth 1 -type f -name 'c*' | sort | head -1)
echo "  chmod u+s ${some_bin#"$img"}"
chmod u+s "$some_bin"
echo "  a new job in /etc/cron.d"
mkdir -p "$img/etc/cron.d"; echo '* * * * * root /tmp/.x' > "$img/etc/cron.d/.hidden"
victim=$(find "$img/usr/bin" -maxdepth 1 -type f -name 'd*' | sort | head -1)
echo "  rm ${victim#"$img"}"
rm "$victim"
conf=$(find "$img/etc" -maxdepth 1 -type f -name '*.conf' -readable | sort | head -1)
echo "  edit ${conf#"$img"} and put its old mtime back"
touch -r "$conf" "$work/mtime"; echo '# quick fix' >> "$conf"; touch -r "$work/mtime" "$conf"

step "the check catches all of it (exit 1), re-hashing only what changed"
set +e
"$dw" check --baseline "$work/baseline.dwb" --trusted-key "$work/pipeline.pub" \
  --root "$img" --state-dir "$work/state"
status=$?
set -e
echo "exit status $status"
[ "$status" = 1 ] || { echo "demo failed: expected drift (exit 1)" >&2; exit 1; }

step "the same as JSON for machines (first violation shown)"
"$dw" check --baseline "$work/baseline.dwb" --trusted-key "$work/pipeline.pub" \
  --root "$img" --state-dir "$work/state" --format json \
  | python3 -c 'import json,sys; r=json.load(sys.stdin); print(json.dumps(r["violations"][0], indent=2)); print("summary:", json.dumps(r["summary"]["by_kind"]))' || true

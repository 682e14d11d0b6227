#!/usr/bin/env bash
# Collector ingest benchmark: one real `driftwatch-collector serve` (release build) per backend,
# driven by bench/loadgen (driftwatch-loadgen) over real TLS 1.3 mTLS report streams, one
# enrolled identity per agent. Phases:
#   ingest   peak sustained acked violation records/s (durable commits), median of --runs
#   latency  p99 ack latency at half the measured peak (paced senders)
#   idle     collector VmRSS/VmHWM with --idle-agents connected agents heartbeating
# Prints a markdown table; every process it starts is stopped on exit (trap).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNS=3
DURATION=20s
WARMUP=3s
AGENTS=200
ITEMS=500
WINDOW=4
IDLE_AGENTS=10000
HOLD=65s
BACKENDS=sqlite,postgres
PHASES=ingest,latency,idle
BUILD=1
LOADGEN_CPUS=
COLLECTOR_CPUS=
PG_SETTINGS=()
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

usage() {
    cat <<EOF
usage: bench/collector.sh [options]
  --runs N            ingest/latency runs per backend, median reported (default $RUNS)
  --duration D        measured time per run (default $DURATION; warm-up $WARMUP extra)
  --agents N          agents for ingest/latency (default $AGENTS)
  --items N           DriftItems per report (default $ITEMS)
  --window N          unacked reports per stream in the ingest phase (default $WINDOW)
  --idle-agents N     agents for the idle/RSS phase (default $IDLE_AGENTS)
  --hold D            how long the idle agents stay connected (default $HOLD)
  --backends LIST     sqlite,postgres (default $BACKENDS)
  --phases LIST       ingest,latency,idle (default $PHASES; latency needs ingest)
  --latency-rate R    pace the latency phase at R records/s instead of half the measured peak
                      (to compare two builds at one rate; the PASS/MISS line then says so)
  --loadgen-cpus L    pin the load generator to these CPUs (taskset -c L; default: unpinned)
  --collector-cpus L  pin the collector likewise (PostgreSQL is never pinned)
  --pg-setting K=V    extra PostgreSQL server setting (repeatable; e.g. shared_buffers=2GB);
                      durability settings (fsync, synchronous_commit) are refused
  --no-build          use the existing release binaries
Builds with CARGO_PROFILE_RELEASE_LTO=false unless that variable is already set. The collector
logs its group-commit statistics every 5 s and each reconcile round's reads (RUST_LOG, default
info,driftwatch_collector::ingest::writer=debug,driftwatch_collector::reconcile=debug); logs
are copied next to the JSON results.
Example (the whole issue-4 measurement, PASS/MISS per target at the end):
  sudo bench/collector.sh --runs 3 --duration 15s
EOF
}

while (($#)); do
    case $1 in
        --runs) RUNS=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --latency-rate) LATENCY_RATE=$2; shift 2 ;;
        --agents) AGENTS=$2; shift 2 ;;
        --items) ITEMS=$2; shift 2 ;;
        --window) WINDOW=$2; shift 2 ;;
        --idle-agents) IDLE_AGENTS=$2; shift 2 ;;
        --hold) HOLD=$2; shift 2 ;;
        --backends) BACKENDS=$2; shift 2 ;;
        --phases) PHASES=$2; shift 2 ;;
        --loadgen-cpus) LOADGEN_CPUS=$2; shift 2 ;;
        --collector-cpus) COLLECTOR_CPUS=$2; shift 2 ;;
        --pg-setting)
            [[ $2 == *=* ]] || { echo "--pg-setting wants NAME=VALUE, got '$2'" >&2; exit 2; }
            case ${2%%=*} in
                fsync | synchronous_commit | full_page_writes | wal_level)
                    echo "--pg-setting ${2%%=*}: the benchmark keeps durability at its defaults" >&2
                    exit 2
                    ;;
            esac
            PG_SETTINGS+=("$2"); shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

log() { printf '[collector-bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
has() { [[ ,$2, == *,$1,* ]]; }

if ((BUILD)); then
    log "building release binaries (CARGO_PROFILE_RELEASE_LTO=${CARGO_PROFILE_RELEASE_LTO:-false})"
    (cd "$ROOT" && CARGO_PROFILE_RELEASE_LTO=${CARGO_PROFILE_RELEASE_LTO:-false} \
        cargo build --release -p driftwatch-collector -p driftwatch-loadgen)
fi
COLLECTOR=$TARGET_DIR/release/driftwatch-collector
LOADGEN=$TARGET_DIR/release/driftwatch-loadgen
[[ -x $COLLECTOR && -x $LOADGEN ]] || die "missing $COLLECTOR or $LOADGEN (run without --no-build)"

# 10,000 agents: one fd per connection in the collector and in the load generator.
want_fds=$((IDLE_AGENTS + AGENTS + 1024))
if (($(ulimit -n) < want_fds)); then
    ulimit -n "$want_fds" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
fi
(($(ulimit -n) >= want_fds)) || log "warning: ulimit -n is $(ulimit -n), below $want_fds"

WORK=$(mktemp -d /var/tmp/dw-collector-bench.XXXXXX)
chmod 711 "$WORK" # the postgres user must reach $WORK/pg
RESULTS=/var/tmp/dw-collector-bench-results-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$RESULTS"
COLLECTOR_PID=
PG_DIR=
PG_BIN=
PG_PORT=5439

pg() { # run a PostgreSQL binary, as the postgres user when we are root
    local b=$1; shift
    if ((EUID == 0)); then runuser -u postgres -- "$PG_BIN/$b" "$@"; else "$PG_BIN/$b" "$@"; fi
}

stop_collector() {
    if [[ -n $COLLECTOR_PID ]]; then
        kill -TERM "$COLLECTOR_PID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$COLLECTOR_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$COLLECTOR_PID" 2>/dev/null || true
        wait "$COLLECTOR_PID" 2>/dev/null || true
        COLLECTOR_PID=
    fi
}

stop_postgres() {
    if [[ -n $PG_DIR && -f $PG_DIR/data/postmaster.pid ]]; then
        pg pg_ctl -D "$PG_DIR/data" -m fast -w -t 30 stop >/dev/null 2>&1 || true
    fi
    PG_DIR=
}

cleanup() {
    local rc=$?
    stop_collector
    stop_postgres
    if ((rc == 0)); then rm -rf -- "$WORK"; else log "kept $WORK for inspection"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_postgres() {
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [[ -x $PG_BIN/initdb ]] || die "PostgreSQL not installed (apt-get install postgresql)"
    PG_DIR=$WORK/pg
    mkdir -p "$PG_DIR"
    ((EUID == 0)) && chown postgres: "$PG_DIR"
    pg initdb -D "$PG_DIR/data" -U postgres --auth=trust --encoding=UTF8 --locale=C >"$WORK/initdb.log" 2>&1 ||
        die "initdb failed: $(tail -n 3 "$WORK/initdb.log")"
    # Defaults for durability (fsync=on, synchronous_commit=on); only the socket is private.
    local opts="-k $PG_DIR -p $PG_PORT -c listen_addresses='' -c max_connections=200 -c log_checkpoints=on"
    local kv
    for kv in "${PG_SETTINGS[@]}"; do opts+=" -c $kv"; done
    log "postgres settings: ${PG_SETTINGS[*]:-(defaults)}"
    pg pg_ctl -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 60 -o "$opts" \
        start >/dev/null || die "pg_ctl start failed"
    pg createdb -h "$PG_DIR" -p "$PG_PORT" -U postgres driftwatch || die "createdb failed"
}

# start_collector BACKEND NAME: writes the config, starts `serve`, waits for the port.
GRPC_PORT=17443
HTTP_PORT=17480
start_collector() {
    local backend=$1 name=$2 state=$WORK/$2
    mkdir -p "$state"
    CONFIG=$state/collector.toml
    {
        echo "state_dir = \"$state\""
        echo "grpc_listen = \"127.0.0.1:$GRPC_PORT\""
        echo "http_listen = \"127.0.0.1:$HTTP_PORT\""
        echo "max_connections = $((IDLE_AGENTS + 2048))"
        if [[ $backend == postgres ]]; then
            echo "database_url = \"postgres:///driftwatch?host=$PG_DIR&port=$PG_PORT&user=postgres\""
        fi
    } >"$CONFIG"
    # The group-commit writer's statistics (batch sizes, commit times, waits) every 5 s.
    RUST_LOG=${RUST_LOG:-info,driftwatch_collector::ingest::writer=debug,driftwatch_collector::reconcile=debug} \
        ${COLLECTOR_CPUS:+taskset -c "$COLLECTOR_CPUS"} "$COLLECTOR" serve --config "$CONFIG" >"$state/collector.log" 2>&1 &
    COLLECTOR_PID=$!
    for _ in $(seq 300); do
        grep -q 'collector serving' "$state/collector.log" && break
        kill -0 "$COLLECTOR_PID" 2>/dev/null || die "collector exited: $(tail -n 5 "$state/collector.log")"
        sleep 0.1
    done
    grep -q 'collector serving' "$state/collector.log" || die "collector did not start"
    TOKEN=$("$COLLECTOR" token create --config "$CONFIG" --ttl 3h --uses 1000000 2>/dev/null | tail -n 1)
    [[ $TOKEN == dwt_* ]] || die "token create failed"
    CA=$state/ca/ca.pem
}

postmaster_pid() { [[ -n $PG_DIR ]] && head -n 1 "$PG_DIR/data/postmaster.pid"; }

loadgen() { # loadgen MODE PREFIX ARGS...
    local mode=$1 prefix=$2; shift 2
    ${LOADGEN_CPUS:+taskset -c "$LOADGEN_CPUS"} "$LOADGEN" "$mode" --url "https://127.0.0.1:$GRPC_PORT" --ca-file "$CA" \
        --token "$TOKEN" --host-prefix "$prefix" "$@"
}

median_field() { # median_field FIELD FILE...
    python3 - "$@" <<'PY'
import json, statistics, sys
f = sys.argv[1]
v = [json.load(open(p))[f] for p in sys.argv[2:]]
print(statistics.median(v))
PY
}

for backend in ${BACKENDS//,/ }; do
    has ingest "$PHASES" || break
    [[ $backend == postgres ]] && start_postgres
    start_collector "$backend" "$backend"
    log "[$backend] collector pid $COLLECTOR_PID on 127.0.0.1:$GRPC_PORT"
    cpu_args=(--collector-pid "$COLLECTOR_PID")
    [[ $backend == postgres ]] && cpu_args+=(--postgres-pid "$(postmaster_pid)")
    files=()
    for r in $(seq "$RUNS"); do
        out=$RESULTS/$backend-ingest-$r.json
        log "[$backend] ingest run $r/$RUNS: $AGENTS agents x $ITEMS items, window $WINDOW, $DURATION"
        loadgen ingest "i$r-" --agents "$AGENTS" --items "$ITEMS" --window "$WINDOW" \
            --duration "$DURATION" --warmup "$WARMUP" "${cpu_args[@]}" >"$out"
        log "[$backend]   $(jq -c '{records_per_s, resyncs, stream_errors, cpu_s}' "$out")"
        files+=("$out")
    done
    peak=$(median_field records_per_s "${files[@]}")
    if has latency "$PHASES"; then
        half=${LATENCY_RATE:-$(python3 -c "print($peak / 2)")}
        files=()
        for r in $(seq "$RUNS"); do
            out=$RESULTS/$backend-latency-$r.json
            log "[$backend] latency run $r/$RUNS at $half records/s (median peak $peak)"
            loadgen latency "l$r-" --agents "$AGENTS" --items "$ITEMS" --rate "$half" \
                --duration "$DURATION" --warmup "$WARMUP" "${cpu_args[@]}" >"$out"
            log "[$backend]   $(jq -c '{records_per_s, ack_ms_p50, ack_ms_p99, ack_ms_max, stream_errors, cpu_s}' "$out")"
            files+=("$out")
        done
    fi
    ps -o rss= -p "$COLLECTOR_PID" >"$RESULTS/$backend-collector-rss-kib.txt" || true
    stop_collector
    cp "$WORK/$backend/collector.log" "$RESULTS/$backend-collector.log" || true
    if [[ $backend == postgres ]]; then
        stop_postgres
        cp "$WORK/pg/server.log" "$RESULTS/postgres-server.log" || true
    fi
done

if has idle "$PHASES"; then
    start_collector sqlite idle
    log "[idle] $IDLE_AGENTS agents, hold $HOLD (collector pid $COLLECTOR_PID, ulimit -n $(ulimit -n))"
    loadgen idle "h-" --agents "$IDLE_AGENTS" --hold "$HOLD" --collector-pid "$COLLECTOR_PID" \
        --connect-concurrency 64 >"$RESULTS/idle.json"
    log "[idle]   $(jq -c '{connected, failed, still_connected_at_end, rss_kib_peak_sampled, hwm_kib_end}' "$RESULTS/idle.json")"
    stop_collector
fi

python3 - "$RESULTS" "$BACKENDS" "$PHASES" "${LATENCY_RATE:-}" <<'PY'
import glob, json, os, statistics, sys
res, backends, phases = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")
fixed_rate = sys.argv[4] != ""
def load(pattern):
    return [json.load(open(p)) for p in sorted(glob.glob(os.path.join(res, pattern)))]
print("| backend | phase | runs | result (median) | all runs | target | pass |")
print("| --- | --- | ---: | ---: | --- | ---: | --- |")
for b in backends:
    ing = load(f"{b}-ingest-*.json")
    if "ingest" in phases and ing:
        v = [r["records_per_s"] for r in ing]
        m = statistics.median(v)
        bad = sum(r["resyncs"] + r["stream_errors"] for r in ing)
        note = f" ({bad} resyncs/errors)" if bad else ""
        print(f"| {b} | sustained records/s ({ing[0]['agents']} agents x {ing[0]['items_per_report']} items, window {ing[0]['window']}) | {len(v)} | {m:,.0f}{note} | "
              + ", ".join(f"{x:,.0f}" for x in v) + f" | ≥ 50,000 | {'PASS' if m >= 50000 else 'MISS'} |")
    lat = load(f"{b}-latency-*.json")
    if "latency" in phases and lat:
        v = [r["ack_ms_p99"] for r in lat]
        m = statistics.median(v)
        rate = lat[0]["target_rate"]
        got = statistics.median(r["records_per_s"] for r in lat)
        print(f"| {b} | p99 ack latency at {rate:,.0f} records/s (achieved {got:,.0f}; p50 {statistics.median(r['ack_ms_p50'] for r in lat):.1f} ms) | {len(v)} | {m:.1f} ms | "
              + ", ".join(f"{x:.1f}" for x in v) + " | ≤ 250 ms at half the peak | "
              + ("n/a (--latency-rate)" if fixed_rate else ('PASS' if m <= 250 else 'MISS')) + " |")
p = os.path.join(res, "idle.json")
if "idle" in phases and os.path.exists(p):
    r = json.load(open(p))
    mib = max(r["rss_kib_peak_sampled"], r["hwm_kib_end"] or 0) / 1024
    ok = r["connected"] == r["agents"] and r["still_connected_at_end"] == r["agents"] and mib <= 1024
    print(f"| sqlite | collector peak RSS (VmHWM), {r['connected']:,}/{r['agents']:,} agents connected, "
          f"{r['still_connected_at_end']:,} still at the end of {r['hold_s']:.0f} s, {r['heartbeats_sent']:,} heartbeats "
          f"(VmRSS at end {r['rss_kib_end'] / 1024:.0f} MiB, before {r['rss_kib_before'] / 1024:.0f} MiB) | 1 | {mib:.0f} MiB | | ≤ 1024 MiB | {'PASS' if ok else 'MISS'} |")
PY
log "raw results (JSON per run, collector logs stay in $WORK only on failure): $RESULTS"

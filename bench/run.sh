#!/usr/bin/env bash
# driftwatch benchmark harness: driftwatch-agent vs AIDE, b3sum and find,
# side by side, in one run, with a warm page cache.
#
# See docs/benchmarks.md for what each competitor does and why it is
# comparable.  Run as root: `sudo bench/run.sh`.
set -euo pipefail

# The whole script is one compound command, so bash parses all of it before
# running any: editing this file during a (long) run cannot break that run.
{

usage() {
    cat <<'EOF'
Usage: sudo bench/run.sh [OPTIONS]

Benchmarks driftwatch-agent (baseline create, cached check) against
`aide --init`, b3sum (2 processes) and `find -printf`, on:
  usr     a copy of this machine's /usr (made once with `cp -a /usr`, reused)
  debian  the debootstrap'd Debian minbase root used by the test suite
          (built here with debootstrap if missing)
and prints a markdown table per dataset with median/min/max wall time,
the ratios against the performance targets, and PASS/MISS per target.

Options:
  --runs N             timed runs per command (default: 5); each command also
                       gets one untimed warm-up run
  --datasets LIST      comma-separated subset of: usr,debian (default: usr,debian)
  --data-dir DIR       bench data dir, outside the repo
                       (default: $DRIFTWATCH_BENCH_DIR or /var/tmp/driftwatch-bench)
  --results-dir DIR    where hyperfine JSON and summary.md go
                       (default: DATA_DIR/results/<UTC timestamp>)
  --agent PATH         driftwatch-agent binary
                       (default: <repo>/target/release/driftwatch-agent)
  --build              run `cargo build --release -p driftwatch-agent` first
  --no-driftwatch      measure only the competitors; driftwatch rows are
                       marked "not yet measured" (also the fallback when the
                       agent binary does not exist)
  --policy FILE        pass --policy FILE to driftwatch-agent baseline/check
                       (default: the built-in policy)
  --threads N          pass --threads N to driftwatch-agent baseline/check
                       (default: the agent's own default)
  --nice N             run the whole benchmark at this nice value (e.g. -10,
                       needs root) so that other work on the machine skews
                       it less; recorded in the report (default: unchanged)
  --aide-workers LIST  AIDE --workers values to probe once; the fastest is
                       used for the timed runs (default: 1,2,4)
  -h, --help           show this help

Environment:
  DRIFTWATCH_TEST_CACHE  parent of the Debian root
                         (default: /var/cache/driftwatch-tests)
  DRIFTWATCH_BENCH_DIR   default for --data-dir

Missing tools (aide, b3sum, hyperfine, time, debootstrap, python3) are
installed with apt-get when running as root.
EOF
}

log() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() { printf 'ERROR: %s\n' "$*" >&2; exit 2; }

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNS=5
DATASETS=usr,debian
DATA_DIR=${DRIFTWATCH_BENCH_DIR:-/var/tmp/driftwatch-bench}
TEST_CACHE=${DRIFTWATCH_TEST_CACHE:-/var/cache/driftwatch-tests}
RESULTS_DIR=
AGENT=$REPO_ROOT/target/release/driftwatch-agent
BUILD=0
USE_DW=1
DW_THREADS=
DW_POLICY=
AIDE_WORKERS=1,2,4
NICE=
ORIG_ARGS=("$@")

while (($#)); do
    case $1 in
        --runs) RUNS=${2:?--runs needs a value}; shift 2 ;;
        --runs=*) RUNS=${1#*=}; shift ;;
        --datasets) DATASETS=${2:?--datasets needs a value}; shift 2 ;;
        --datasets=*) DATASETS=${1#*=}; shift ;;
        --data-dir) DATA_DIR=${2:?--data-dir needs a value}; shift 2 ;;
        --data-dir=*) DATA_DIR=${1#*=}; shift ;;
        --results-dir) RESULTS_DIR=${2:?--results-dir needs a value}; shift 2 ;;
        --results-dir=*) RESULTS_DIR=${1#*=}; shift ;;
        --agent) AGENT=${2:?--agent needs a value}; shift 2 ;;
        --agent=*) AGENT=${1#*=}; shift ;;
        --build) BUILD=1; shift ;;
        --no-driftwatch) USE_DW=0; shift ;;
        --policy) DW_POLICY=${2:?--policy needs a value}; shift 2 ;;
        --policy=*) DW_POLICY=${1#*=}; shift ;;
        --threads) DW_THREADS=${2:?--threads needs a value}; shift 2 ;;
        --threads=*) DW_THREADS=${1#*=}; shift ;;
        --nice) NICE=${2:?--nice needs a value}; shift 2 ;;
        --nice=*) NICE=${1#*=}; shift ;;
        --aide-workers) AIDE_WORKERS=${2:?--aide-workers needs a value}; shift 2 ;;
        --aide-workers=*) AIDE_WORKERS=${1#*=}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "--runs must be a positive integer, got '$RUNS'"
[[ -z $DW_THREADS || $DW_THREADS =~ ^[1-9][0-9]*$ ]] || die "--threads must be a positive integer"
if [[ -n $DW_POLICY ]]; then
    [[ -f $DW_POLICY ]] || die "--policy: no such file: $DW_POLICY"
    DW_POLICY=$(cd "$(dirname "$DW_POLICY")" && pwd)/$(basename "$DW_POLICY")
fi
[[ -z $NICE || $NICE =~ ^-?[0-9]+$ ]] || die "--nice must be an integer"
[[ $AIDE_WORKERS =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || die "--aide-workers must look like 1,2,4"
IFS=, read -r -a DATASET_LIST <<<"$DATASETS"
for ds in "${DATASET_LIST[@]}"; do
    case $ds in usr|debian) ;; *) die "unknown dataset '$ds' (want usr and/or debian)" ;; esac
done

case $DATA_DIR in
    "$REPO_ROOT"|"$REPO_ROOT"/*) die "--data-dir must be outside the repository" ;;
esac

# ---------------------------------------------------------------- tools ----

# Debian package that provides each command.
declare -A PKG_OF=(
    [aide]=aide [b3sum]=b3sum [hyperfine]=hyperfine [/usr/bin/time]=time
    [debootstrap]=debootstrap [python3]=python3 [find]=findutils
)
APT_UPDATED=0

need() {
    local cmd=$1
    command -v "$cmd" >/dev/null 2>&1 && return 0
    local pkg=${PKG_OF[$cmd]:-$cmd}
    if ((EUID == 0)) && command -v apt-get >/dev/null 2>&1; then
        log "installing missing tool '$cmd' (apt package $pkg)"
        if ((APT_UPDATED == 0)); then
            apt-get update -qq
            APT_UPDATED=1
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >&2
        command -v "$cmd" >/dev/null 2>&1 || die "'$cmd' still missing after installing $pkg"
    else
        die "'$cmd' is missing; install the '$pkg' package (or run this script as root)"
    fi
}

for t in hyperfine aide b3sum /usr/bin/time python3 find; do need "$t"; done

if ((BUILD)); then
    log "building driftwatch-agent (release)"
    (cd "$REPO_ROOT" && cargo build --release -p driftwatch-agent) >&2
fi
if [[ -n $NICE ]]; then
    renice -n "$NICE" -p $$ >/dev/null || die "renice -n $NICE failed (negative values need root)"
fi
DW_NOTE=
if ((USE_DW)) && [[ ! -x $AGENT ]]; then
    warn "driftwatch-agent binary not found at $AGENT; driftwatch rows will be 'not yet measured' (use --build or --agent PATH)"
    USE_DW=0
    DW_NOTE="binary not found"
elif ((USE_DW == 0)); then
    DW_NOTE="--no-driftwatch"
fi

# ------------------------------------------------------------- datasets ----

mkdir -p "$DATA_DIR"
if [[ -z $RESULTS_DIR ]]; then
    RESULTS_DIR=$DATA_DIR/results/$(date -u +%Y%m%dT%H%M%SZ)
fi
mkdir -p "$RESULTS_DIR"
RESULTS_DIR=$(cd "$RESULTS_DIR" && pwd)

# Every temp dir made by this script; removed on exit.
TMP_DIRS=()
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
    local d
    for d in "${TMP_DIRS[@]}"; do
        [[ -n $d && -d $d ]] && rm -rf -- "$d"
    done
    return 0
}
trap cleanup EXIT

prepare_usr() {
    local dst=$DATA_DIR/usr
    if [[ -d $dst ]]; then
        log "reusing /usr copy at $dst"
        TREE=$dst
    else
        ((EUID == 0)) || die "copying /usr faithfully (owners, modes) needs root"
        local tmp
        tmp=$(mktemp -d "$DATA_DIR/.usr-partial.XXXXXX")
        TMP_DIRS+=("$tmp")
        log "copying /usr to $dst (cp -a, once; takes a minute)"
        cp -a /usr "$tmp/usr"
        mv -T "$tmp/usr" "$dst"
    fi
    TREE=$dst
}

# Mirror of this machine's own apt sources: the first URIs: of a deb822
# .sources file, else the URL of the first deb line of sources.list.
apt_mirror() {
    local f url=
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        url=$(awk 'tolower($1) == "uris:" { print $2; exit }' "$f")
        [[ -n $url ]] && break
    done
    if [[ -z $url && -f /etc/apt/sources.list ]]; then
        # deb [opts] URL suite components...
        url=$(awk '$1 == "deb" { i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ } print $i; exit }' /etc/apt/sources.list)
    fi
    [[ -n $url ]] || die "cannot find an apt mirror in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list"
    printf '%s\n' "$url"
}

prepare_debian() {
    local suite
    # shellcheck disable=SC1091
    suite=$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")
    [[ -n $suite ]] || die "VERSION_CODENAME missing from /etc/os-release"
    local dst=$TEST_CACHE/debian-$suite-minbase
    if [[ -d $dst ]]; then
        log "reusing Debian root at $dst"
    else
        ((EUID == 0)) || die "$dst is missing and building it with debootstrap needs root"
        need debootstrap
        local mirror tmp
        mirror=$(apt_mirror)
        mkdir -p "$TEST_CACHE"
        # Build next to the destination and rename into place, so that a
        # half-built root is never seen under the final name.
        tmp=$(mktemp -d "$TEST_CACHE/.debian-$suite-minbase.XXXXXX")
        TMP_DIRS+=("$tmp")
        log "debootstrap --variant=minbase $suite -> $dst (mirror $mirror)"
        debootstrap --variant=minbase "$suite" "$tmp/root" "$mirror" >"$tmp/debootstrap.log" 2>&1 \
            || { tail -n 30 "$tmp/debootstrap.log" >&2; die "debootstrap failed"; }
        if ! mv -T "$tmp/root" "$dst" 2>/dev/null; then
            # Someone else (e.g. the test harness) finished first: use theirs.
            [[ -d $dst ]] || die "cannot rename $tmp/root to $dst"
            log "another process built $dst concurrently; using it"
        fi
    fi
    TREE=$dst
}

# ---------------------------------------------------------- machine facts ----

first_line() { "$@" 2>&1 | sed -n '1p'; }

cpu_model=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
agent_version="not measured ($DW_NOTE)"
agent_sha=
if ((USE_DW)); then
    # Benchmark a private copy: a rebuild during the run must not change it.
    agent_copy=$(mktemp -d "$DATA_DIR/agent.XXXXXX")
    TMP_DIRS+=("$agent_copy")
    cp "$AGENT" "$agent_copy/driftwatch-agent"
    AGENT=$agent_copy/driftwatch-agent
    agent_version=$(first_line "$AGENT" --version || true)
    agent_sha=$(sha256sum "$AGENT" | cut -d' ' -f1)
fi
git_rev=$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo "no commit")
if [[ -n $(git -C "$REPO_ROOT" status --porcelain 2>/dev/null || true) ]]; then
    git_rev="$git_rev (dirty work tree)"
fi

FACTS=$RESULTS_DIR/machine.md
{
    echo "## Machine"
    echo
    echo "| fact | value |"
    echo "| --- | --- |"
    echo "| date (UTC) | $(date -u '+%Y-%m-%d %H:%M') |"
    echo "| command | \`bench/run.sh ${ORIG_ARGS[*]}\` |"
    echo "| nproc | $(nproc) |"
    echo "| CPU | ${cpu_model:-unknown} |"
    echo "| memory | $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo) |"
    echo "| kernel | $(uname -sr) |"
    echo "| data dir filesystem | $(df --output=fstype "$DATA_DIR" | sed -n '2p') |"
    echo "| driftwatch-agent | $agent_version${agent_sha:+ (sha256 ${agent_sha:0:16}…)} |"
    echo "| repo revision | $git_rev |"
    echo "| aide | $(first_line aide --version) |"
    echo "| b3sum | $(first_line b3sum --version) |"
    echo "| find | $(first_line find --version) |"
    echo "| hyperfine | $(first_line hyperfine --version) |"
    echo "| runs per command | $RUNS (+1 untimed warm-up each) |"
    echo "| nice value of the benchmark | $(ps -o ni= -p $$ | tr -d ' ') |"
    echo "| load average at start (1/5/15 min) | $(cut -d' ' -f1-3 /proc/loadavg) |"
} >"$FACTS"
read -r load1 _ </proc/loadavg
if awk -v l="$load1" 'BEGIN { exit !(l > 0.5) }'; then
    warn "load average is $load1: other processes compete for the CPUs and will skew the numbers"
fi

# ---------------------------------------------------------- benchmarking ----

HF=(hyperfine --style basic --shell bash --time-unit second)

q() { printf '%q' "$1"; }

# RSS of one command (KiB), via GNU time; the command's output is discarded.
# Also records its wall time and exit status.  Usage: measure_rss OUTFILE LABEL CMD...
measure_rss() {
    local out=$1 label=$2 tf rc=0 m_rss='' m_wall='' m_in=''
    shift 2
    tf=$(mktemp)
    # %I: 512-byte blocks the process read from storage (page cache hits are free).
    /usr/bin/time -f '%M %e %I' -o "$tf" "$@" >/dev/null 2>&1 || rc=$?
    # GNU time puts "Command exited with non-zero status N" before the format.
    read -r m_rss m_wall m_in < <(tail -n 1 "$tf") || true
    rm -f "$tf"
    printf '%s\t%s\t%s\t%s\t%s\n' "$label" "${m_rss:-?}" "${m_wall:-?}" "$rc" "${m_in:-?}" >>"$out"
    return "$rc"
}

# What the built-in policy's [paths].exclude leaves in scope of TREE (AIDE,
# b3sum and find cover everything), so readers can judge the comparison.
# Prints meta lines.  Globs as in globset: * stays within a path component.
policy_coverage() {
    local tree=$1 toml=$REPO_ROOT/agent/src/policy/default.toml
    if [[ -n $DW_POLICY ]]; then
        printf 'policy\t%s\n' "$DW_POLICY"
        return 0
    fi
    [[ -f $toml ]] || { printf 'policy\tbuilt-in (excludes unknown)\n'; return 0; }
    python3 - "$tree" "$toml" <<'PY'
import os, re, sys, tomllib

tree, toml = sys.argv[1], sys.argv[2]
excl = tomllib.load(open(toml, "rb")).get("paths", {}).get("exclude", [])

def glob_re(g):
    out, i = "", 0
    while i < len(g):
        if g.startswith("**/", i):
            out += "(?:.*/)?"; i += 3
        elif g.startswith("/**", i) and i + 3 == len(g):
            out += "/.*"; i += 3
        elif g.startswith("**", i):
            out += ".*"; i += 2
        elif g[i] == "*":
            out += "[^/]*"; i += 1
        elif g[i] == "?":
            out += "[^/]"; i += 1
        else:
            out += re.escape(g[i]); i += 1
    return re.compile(out + r"\Z")

pats = [glob_re(g) for g in excl]
excluded = lambda p: any(r.match(p) for r in pats)
entries = files = size = 0
for top, dirs, names in os.walk(tree):
    rel = "/" + os.path.relpath(top, tree) if top != tree else ""
    keep = [d for d in dirs if not excluded(f"{rel}/{d}")]
    # os.walk lists symlinks to directories in dirs but does not follow them
    entries += len(keep) + (1 if top == tree else 0)
    dirs[:] = [d for d in keep if not os.path.islink(os.path.join(top, d))]
    for n in names:
        if excluded(f"{rel}/{n}"):
            continue
        entries += 1
        st = os.lstat(os.path.join(top, n))
        if (st.st_mode & 0o170000) == 0o100000:
            files += 1
            size += st.st_size
print(f"policy\tbuilt-in\nscope_entries\t{entries}\nscope_files\t{files}\nscope_bytes\t{size}")
PY
}

bench_dataset() {
    local name=$1 tree=$2
    local res=$RESULTS_DIR/$name
    mkdir -p "$res"
    local work
    # The work dir is a sibling of nothing that is benchmarked.
    work=$(mktemp -d "$DATA_DIR/work-$name.XXXXXX")
    TMP_DIRS+=("$work")

    local meta=$res/meta.tsv rss=$res/rss.tsv
    : >"$meta"
    : >"$rss"
    printf 'dataset\t%s\ntree\t%s\n' "$name" "$tree" >>"$meta"

    log "[$name] counting $tree"
    local entries files bytes
    entries=$(find "$tree" -printf '.' | wc -c)
    files=$(find "$tree" -type f -printf '.' | wc -c)
    bytes=$(find "$tree" -type f -printf '%s\n' | awk '{ s += $1 } END { printf "%.0f", s }')
    printf 'entries\t%s\nfiles\t%s\nbytes\t%s\n' "$entries" "$files" "$bytes" >>"$meta"
    policy_coverage "$tree" >>"$meta"

    log "[$name] warming the page cache (read every regular file once)"
    find "$tree" -type f -print0 | xargs -0 -r -P2 -n 1000 cat >/dev/null

    # --- AIDE: generated config, database to a temp file, no gzip. ---------
    local aide_conf=$work/aide.conf aide_db=$work/aide.db.new tree_re
    # AIDE rule paths are PCRE: escape metacharacters.
    tree_re=$(printf '%s' "$tree" | sed 's/[][\\.^$*+?(){}|]/\\&/g')
    cat >"$aide_conf" <<EOF
# generated by bench/run.sh
database_out=file:$aide_db
gzip_dbout=no
# do not hash the output database with ten digests at the end
database_attrs=E
report_url=stdout
log_level=error
Rule = sha256+p+i+n+u+g+s+m+c+xattrs
$tree_re Rule
EOF
    aide --config-check --config="$aide_conf" >/dev/null || die "aide rejected $aide_conf"
    cp "$aide_conf" "$res/aide.conf"

    log "[$name] probing AIDE --workers=$AIDE_WORKERS (one run each)"
    "${HF[@]}" --runs 1 --prepare "rm -f $(q "$aide_db")" \
        -L workers "$AIDE_WORKERS" \
        --command-name 'aide --init --workers={workers}' \
        --export-json "$res/aide-workers.json" \
        "aide --init --config=$(q "$aide_conf") --workers={workers}" >&2
    local aide_w
    aide_w=$(python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))["results"]
print(min(r, key=lambda x: x["mean"])["parameters"]["workers"])' "$res/aide-workers.json")
    printf 'aide_workers\t%s\n' "$aide_w" >>"$meta"
    log "[$name] fastest AIDE worker count: $aide_w"

    # --- driftwatch: key, reference baseline, filled scan cache. -----------
    local dw=$USE_DW dw_note=$DW_NOTE key=$work/bench ref=$work/ref.dwb state=$work/state
    local bench_out=$work/bench.dwb
    # Extra driftwatch flags, as an array (for direct runs) and as a quoted
    # string (for hyperfine command lines).
    local -a thr=()
    [[ -n $DW_THREADS ]] && thr+=(--threads "$DW_THREADS")
    [[ -n $DW_POLICY ]] && thr+=(--policy "$DW_POLICY")
    local extra='' a
    for a in "${thr[@]}"; do extra+=" $(q "$a")"; done
    local check_cmd='' create_cmd=''
    if ((dw)); then
        log "[$name] driftwatch: keygen, reference baseline, first check (fills the scan cache)"
        mkdir -p "$state"
        if ! "$AGENT" keygen --out "$key" >"$res/keygen.log" 2>&1; then
            dw=0; dw_note="keygen failed: $(tail -n 1 "$res/keygen.log")"
        elif ! measure_rss "$rss" "baseline create (reference, untimed)" \
            "$AGENT" baseline create --root "$tree" --image-id bench-"$name" \
            --image-version 1 --sign-key "$key.key" --out "$ref" "${thr[@]}"; then
            dw=0; dw_note="baseline create failed"
            "$AGENT" baseline create --root "$tree" --image-id bench-"$name" --image-version 1 \
                --sign-key "$key.key" --out "$ref" "${thr[@]}" >"$res/baseline-error.log" 2>&1 || true
        else
            local rc=0
            measure_rss "$rss" "check, empty state dir (full hash, untimed)" \
                "$AGENT" check --baseline "$ref" --trusted-key "$key.pub" --root "$tree" \
                --state-dir "$state" "${thr[@]}" || rc=$?
            printf 'first_check_exit\t%s\n' "$rc" >>"$meta"
            if ((rc >= 2)); then
                dw=0; dw_note="check exited $rc"
            else
                if ((rc == 1)); then
                    warn "[$name] driftwatch check reports DRIFT on an unchanged tree (exit 1); saving its report"
                    "$AGENT" check --baseline "$ref" --trusted-key "$key.pub" --root "$tree" \
                        --state-dir "$state" --format json "${thr[@]}" >"$res/unexpected-drift.json" 2>&1 || true
                fi
                ls -la "$ref" >"$res/baseline-size.txt"
                du -sb "$state" >"$res/state-dir-size.txt"
                create_cmd="$(q "$AGENT") baseline create --root $(q "$tree") --image-id bench-$name --image-version 1 --sign-key $(q "$key.key") --out $(q "$bench_out")$extra"
                # Exit 1 (drift) is tolerated only if the first check already said so.
                check_cmd="$(q "$AGENT") check --baseline $(q "$ref") --trusted-key $(q "$key.pub") --root $(q "$tree") --state-dir $(q "$state")$extra"
                ((rc == 1)) && check_cmd="$check_cmd || [ \$? -eq 1 ]"
            fi
        fi
    fi
    printf 'driftwatch\t%s\ndriftwatch_note\t%s\n' "$dw" "$dw_note" >>"$meta"

    # --- the side-by-side hyperfine run. ------------------------------------
    local -a names=() cmds=() preps=()
    add() { names+=("$1"); preps+=("$2"); cmds+=("$3"); }
    if ((dw)); then
        add "driftwatch baseline create" "rm -f $(q "$bench_out")" "$create_cmd"
    fi
    add "aide --init (workers=$aide_w)" "rm -f $(q "$aide_db")" \
        "aide --init --config=$(q "$aide_conf") --workers=$aide_w"
    add "b3sum, 2 procs" "true" \
        "find $(q "$tree") -type f -print0 | xargs -0 -P2 -n 1000 b3sum"
    add "b3sum --no-mmap, 2 procs" "true" \
        "find $(q "$tree") -type f -print0 | xargs -0 -P2 -n 1000 b3sum --no-mmap"
    if ((dw)); then
        add "driftwatch check (warm cache)" "true" "$check_cmd"
    fi
    add "find -printf (stat walk)" "true" \
        "find $(q "$tree") -printf '%p %y %m %U %G %s %T@ %C@ %i %D\\n'"
    # Package verification without a baseline, where the tree has a dpkg database.
    if [[ -f $tree/var/lib/dpkg/status ]]; then
        command -v debsums >/dev/null || apt-get install -y -qq debsums >/dev/null 2>&1 || true
        if command -v debsums >/dev/null; then
            if ((dw)); then
                add "driftwatch verify-packages" "true" "$(q "$AGENT") verify-packages --root $(q "$tree")$extra"
            fi
            add "debsums -s -a" "true" "debsums --root=$(q "$tree") -s -a"
        fi
    fi

    local -a args=()
    local i
    for i in "${!cmds[@]}"; do
        # Each prepare step also logs the machine's pgpgin counter (KiB read
        # from storage), so the report can show whether a run really ran from
        # the page cache.
        args+=(--command-name "${names[$i]}"
            --prepare "${preps[$i]}; echo $i \$(awk '\$1 == \"pgpgin\" { print \$2 }' /proc/vmstat) >>$(q "$res/pgpgin.log")")
    done
    log "[$name] hyperfine: ${#cmds[@]} commands x (1 warm-up + $RUNS runs)"
    : >"$res/pgpgin.log"
    for i in "${!names[@]}"; do printf '%s\t%s\n' "$i" "${names[$i]}"; done >"$res/commands.tsv"
    "${HF[@]}" --warmup 1 --runs "$RUNS" "${args[@]}" \
        --cleanup "echo end \$(awk '\$1 == \"pgpgin\" { print \$2 }' /proc/vmstat) >>$(q "$res/pgpgin.log")" \
        --export-json "$res/hyperfine.json" \
        --export-markdown "$res/hyperfine.md" \
        "${cmds[@]}" >&2

    # --- peak RSS (page cache still warm, scan cache filled). --------------
    log "[$name] peak RSS"
    if ((dw)); then
        rm -f "$bench_out"
        measure_rss "$rss" "driftwatch baseline create" \
            "$AGENT" baseline create --root "$tree" --image-id bench-"$name" --image-version 1 \
            --sign-key "$key.key" --out "$bench_out" "${thr[@]}" || true
        measure_rss "$rss" "driftwatch check (warm cache)" \
            "$AGENT" check --baseline "$ref" --trusted-key "$key.pub" --root "$tree" \
            --state-dir "$state" "${thr[@]}" || true
    fi
    rm -f "$aide_db"
    measure_rss "$rss" "aide --init (workers=$aide_w)" \
        aide --init --config="$aide_conf" --workers="$aide_w" || true

    rm -rf -- "$work"
}

render() {
    python3 - "$RESULTS_DIR" "$@" <<'PY'
import json, os, sys

results_dir, datasets = sys.argv[1], sys.argv[2:]
MIB = 1024  # KiB per MiB
RSS_LIMIT_MIB = 64

def fmt_s(x):
    return f"{x:.3f}" if x < 10 else f"{x:.2f}"

out = []
for ds in datasets:
    d = os.path.join(results_dir, ds)
    meta = dict(l.rstrip("\n").split("\t", 1) for l in open(os.path.join(d, "meta.tsv")) if "\t" in l)
    hf = json.load(open(os.path.join(d, "hyperfine.json")))["results"]
    med = {r["command"]: r["median"] for r in hf}
    rss = {}
    for l in open(os.path.join(d, "rss.tsv")):
        f = l.rstrip("\n").split("\t")
        rss[f[0]] = tuple(f[1:5]) if len(f) >= 5 else (*f[1:4], "?")
    dw = meta.get("driftwatch") == "1"
    note = meta.get("driftwatch_note", "")
    gib = int(meta["bytes"]) / 2**30
    out.append(f"## Dataset `{ds}`: {meta['tree']}")
    out.append("")
    out.append(f"{int(meta['entries']):,} entries, {int(meta['files']):,} regular files, "
               f"{gib:.2f} GiB in regular files. AIDE workers probed: fastest was "
               f"`--workers={meta['aide_workers']}`.")
    out.append("")
    if "scope_bytes" in meta:
        sb, se = int(meta["scope_bytes"]), int(meta["scope_entries"])
        out.append(f"driftwatch's built-in policy excludes some paths (e.g. `/var/cache/**`, "
                   f"`**/__pycache__`); it keeps {se:,} entries ({100 * se / int(meta['entries']):.1f}%) and "
                   f"{int(meta['scope_files']):,} regular files holding {sb / 2**30:.2f} GiB "
                   f"({100 * sb / max(int(meta['bytes']), 1):.1f}% of the bytes) in scope. "
                   f"AIDE, b3sum and find cover the whole tree.")
        out.append("")
    elif meta.get("policy", "built-in") != "built-in":
        out.append(f"driftwatch ran with `--policy {meta['policy']}`.")
        out.append("")
    out.append("| command | median (s) | min (s) | max (s) | runs | CPU user+sys, mean (s) | storage reads, worst run (MiB) |")
    out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    order = ["driftwatch baseline create", f"aide --init (workers={meta['aide_workers']})",
             "b3sum, 2 procs", "b3sum --no-mmap, 2 procs",
             "driftwatch check (warm cache)", "find -printf (stat walk)",
             "driftwatch verify-packages", "debsums -s -a"]
    byname = {r["command"]: r for r in hf}
    # Package verification is only benchmarked on trees with a dpkg database.
    if "debsums -s -a" not in byname:
        order = order[:-2]
    # Storage reads (KiB, whole machine) per timed run, from the pgpgin log
    # written by hyperfine's prepare/cleanup steps; the warm-up run is skipped.
    reads = {}
    try:
        idx = dict(l.rstrip("\n").split("\t", 1) for l in open(os.path.join(d, "commands.tsv")))
        marks, cur = [], []
        for l in open(os.path.join(d, "pgpgin.log")):
            k, v = l.split()
            if k == "end":
                marks.append((cur, int(v)))
                cur = []
            else:
                cur.append((k, int(v)))
        for seq, end in marks:
            vals = [v for _, v in seq] + [end]
            deltas = [b - a for a, b in zip(vals, vals[1:])][1:]
            reads[idx[seq[0][0]]] = deltas
    except (OSError, ValueError, KeyError, IndexError):
        pass
    for name in order:
        r = byname.get(name)
        if r is None:
            out.append(f"| {name} | not yet measured ({note}) | | | | | |")
        else:
            rd = reads.get(name)
            rd = f"{max(rd) / 1024:.0f}" if rd else "?"
            out.append(f"| {name} | {fmt_s(r['median'])} | {fmt_s(r['min'])} | "
                       f"{fmt_s(r['max'])} | {len(r['times'])} | {fmt_s(r['user'] + r['system'])} | {rd} |")
    out.append("")

    def ratio_row(label, num, den, limit):
        if num not in med:
            return f"| {label} | not yet measured | ≤ {limit} | — |"
        x = med[num] / med[den]
        return f"| {label} | {x:.3f} | ≤ {limit} | {'PASS' if x <= limit else 'MISS'} |"

    aide = f"aide --init (workers={meta['aide_workers']})"
    out.append("| target | measured | limit | result |")
    out.append("| --- | ---: | ---: | --- |")
    out.append(ratio_row("baseline create / b3sum (2 procs)", "driftwatch baseline create", "b3sum, 2 procs", 1.2))
    out.append(ratio_row("baseline create / AIDE --init", "driftwatch baseline create", aide, 0.15))
    out.append(ratio_row("cached check / find -printf", "driftwatch check (warm cache)", "find -printf (stat walk)", 2))
    if "debsums -s -a" in med:
        out.append(ratio_row("verify-packages / debsums -s -a", "driftwatch verify-packages", "debsums -s -a", 0.5))
    for label in ("driftwatch baseline create", "driftwatch check (warm cache)"):
        v = rss.get(label)
        if ds != "usr":
            continue
        if not dw or v is None or v[0] == "?":
            out.append(f"| peak RSS, {label} | not yet measured | ≤ {RSS_LIMIT_MIB} MiB | — |")
        else:
            mib = int(v[0]) / MIB
            out.append(f"| peak RSS, {label} | {mib:.1f} MiB | ≤ {RSS_LIMIT_MIB} MiB | "
                       f"{'PASS' if mib <= RSS_LIMIT_MIB else 'MISS'} |")
    out.append("")
    # informational
    info = []
    cpu = {r["command"]: r["user"] + r["system"] for r in hf}
    if "driftwatch baseline create" in cpu:
        info.append(f"CPU-time ratios (less sensitive to other load on the machine): "
                    f"baseline create / b3sum {cpu['driftwatch baseline create'] / cpu['b3sum, 2 procs']:.2f}, "
                    f"/ AIDE {cpu['driftwatch baseline create'] / cpu[aide]:.3f}")
    if "driftwatch check (warm cache)" in cpu:
        info.append(f"cached check / find -printf (CPU time) "
                    f"{cpu['driftwatch check (warm cache)'] / cpu['find -printf (stat walk)']:.2f}")
    if "driftwatch baseline create" in med:
        info.append(f"baseline create / b3sum --no-mmap (2 procs): "
                    f"{med['driftwatch baseline create'] / med['b3sum --no-mmap, 2 procs']:.3f}")
    if "first_check_exit" in meta and meta["first_check_exit"] != "0":
        info.append(f"**first check on the unchanged tree exited {meta['first_check_exit']}** "
                    f"(drift reported on an unchanged tree; see unexpected-drift.json)")
    if info:
        out.append("Also: " + "; ".join(info) + ".")
        out.append("")
    out.append("Peak RSS and wall time of single runs (GNU time, warm page cache):")
    out.append("")
    out.append("| run | peak RSS (MiB) | wall (s) | exit | read from storage (MiB) |")
    out.append("| --- | ---: | ---: | ---: | ---: |")
    for label, (kib, wall, rc, blocks) in rss.items():
        m = f"{int(kib) / MIB:.1f}" if kib != "?" else "?"
        b = f"{int(blocks) * 512 / 2**20:.0f}" if blocks != "?" else "?"
        out.append(f"| {label} | {m} | {wall} | {rc} | {b} |")
    out.append("")
out.append("Storage reads are the machine-wide `pgpgin` delta over each timed run (other "
           "processes included); near 0 means the run was served from the page cache.")
out.append("")
print("\n".join(out))
PY
}

SUMMARY=$RESULTS_DIR/summary.md
done_sets=()
TREE=
for ds in "${DATASET_LIST[@]}"; do
    case $ds in
        usr) prepare_usr ;;
        debian) prepare_debian ;;
    esac
    bench_dataset "$ds" "$TREE"
    done_sets+=("$ds")
done

{
    echo "# driftwatch benchmark results"
    echo
    cat "$FACTS"
    echo
    render "${done_sets[@]}"
    echo "Load average at the end (1/5/15 min): $(cut -d' ' -f1-3 /proc/loadavg)."
    echo "Other processes compete for the 2 cores: a high load average means noisy numbers."
    echo
    echo "Raw hyperfine JSON: \`$RESULTS_DIR/<dataset>/hyperfine.json\`"
} >"$SUMMARY"
cat "$SUMMARY"
log "results in $RESULTS_DIR"
exit 0
}

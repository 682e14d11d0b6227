#!/usr/bin/env bash
# Short fuzzing run of driftwatch's parsers of untrusted input (cargo-fuzz + libFuzzer): every
# target in fuzz/Cargo.toml, e.g.
#   baseline_decode  driftwatch_agent::baseline::decode (baseline files)
#   policy_parse     driftwatch_agent::policy::Policy::from_toml (policy text)
#
# Usage: .ci/fuzz.sh [SECONDS]   seconds of fuzzing per target (default 60)
#
# Per target: fuzz/seeds/<target>/ and fuzz/regressions/<target>/ are copied into the corpus
# (so a known reproducer fails the run at once), fuzz/dicts/<target>.dict is used if present.
# Fails if any target finds a crash, panic, timeout (10 s for one input) or out-of-memory input
# (2 GiB RSS, or one allocation of 128 MiB); the reproducer is left in fuzz/artifacts/<target>/
# and printed in hex. The stable toolchain is used with RUSTC_BOOTSTRAP=1, since cargo-fuzz
# needs nightly flags (-Zsanitizer). FUZZ_TARGET_DIR moves the build directory (default
# fuzz/target), e.g. to a directory that outlives the checkout to make later builds quick.
set -euo pipefail

secs="${1:-60}"
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [ "$secs" -lt 1 ]; then
    echo "usage: $0 [SECONDS]" >&2
    exit 2
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fuzz="$root/fuzz"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
cargo fuzz --version

cd "$fuzz"
# Build against the dependency versions the main workspace locked; cargo only adds the
# fuzz-only crates (libfuzzer-sys and its deps). fuzz/Cargo.lock is not committed.
cp "$root/Cargo.lock" "$fuzz/Cargo.lock"

# The same flags for build and run, or `cargo fuzz run` rebuilds. cargo-fuzz's defaults are
# kept: release with debug assertions and overflow checks, and address sanitizer, which is what
# makes -malloc_limit_mb work (without it an allocation that is never touched goes unseen).
build_flags=(--target-dir "${FUZZ_TARGET_DIR:-$fuzz/target}")

start=$(date +%s)
cargo fuzz build "${build_flags[@]}"
echo "fuzz: build took $(($(date +%s) - start)) s"

mapfile -t targets < <(cargo fuzz list)
if [ "${#targets[@]}" -eq 0 ]; then
    echo "fuzz: no fuzz targets" >&2
    exit 1
fi

passed=0
failed=0
for target in "${targets[@]}"; do
    # Longest input tried: text formats need less than binary files.
    case "$target" in
    policy_parse) max_len=65536 ;;
    *) max_len=1048576 ;;
    esac
    extra=()
    if [ -f "$fuzz/dicts/$target.dict" ]; then
        extra+=("-dict=$fuzz/dicts/$target.dict")
    fi
    corpus="$fuzz/corpus/$target"
    artifacts="$fuzz/artifacts/$target"
    log="$fuzz/artifacts/$target.log"
    mkdir -p "$corpus" "$artifacts"
    for d in "$fuzz/seeds/$target" "$fuzz/regressions/$target"; do
        if [ -d "$d" ]; then
            find "$d" -maxdepth 1 -type f -exec cp -t "$corpus" {} +
        fi
    done
    echo "fuzz: running $target for $secs s"
    run_start=$(date +%s)
    if cargo fuzz run "${build_flags[@]}" "$target" "$corpus" -- \
        -max_total_time="$secs" -max_len="$max_len" -timeout=10 \
        -rss_limit_mb=2048 -malloc_limit_mb=128 -print_final_stats=1 "${extra[@]}" \
        >"$log" 2>&1; then
        grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)|^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$log" || true
        echo "fuzz: $target: no crash"
        passed=$((passed + 1))
    else
        echo "fuzz: $target FAILED; last lines of $log:" >&2
        grep -v '^"' "$log" | tail -n 80 >&2
        find "$artifacts" -type f -newermt "@$run_start" | while read -r f; do
            echo "fuzz: reproducer $f ($(stat -c %s "$f") bytes):" >&2
            head -c 4096 "$f" | od -An -tx1 -v >&2
            echo "fuzz: replay: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run $target $f" >&2
        done
        failed=$((failed + 1))
    fi
done

echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]

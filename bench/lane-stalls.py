#!/usr/bin/env python3
"""Write-lane stalls of paced collector-benchmark runs, split by PostgreSQL checkpoint syncs.

usage: bench/lane-stalls.py RESULTS_DIR...   (the /var/tmp/dw-collector-bench-results-<UTC>/
directories `bench/collector.sh` leaves, with the collector's log at debug level and the
PostgreSQL server's log with log_checkpoints, as that script keeps them)

Each of the collector's write lanes logs a line every 5 s (`group commit writer … period_s=…
commit_ms_max=… wait_ms_max=…`). The paced periods (fewer than 20 reports per batch, at least
50 reports) are split by whether a checkpoint's sync phase (from `checkpoint complete: … sync=S
s`, the S seconds before it) overlaps the period, and the median and 90th percentile of the
periods' longest commit and longest queue wait are printed per group.
"""
import datetime
import re
import statistics
import sys

ANSI = re.compile(r"\x1b\[[0-9;]*m")
SYNC = re.compile(r"(\S+ \S+) UTC.*checkpoint complete:.*sync=([\d.]+) s")
PERIOD = re.compile(
    r"^(\S+) .*group commit writer lane=\d period_s=([\d.]+) batches=\d+ reports=(\d+)"
    r".*reports_per_batch=([\d.]+).*commit_ms_max=([\d.]+).*wait_ms_max=([\d.]+)"
)


def seconds(stamp):
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def main(dirs):
    if not dirs:
        sys.exit("usage: bench/lane-stalls.py RESULTS_DIR...")
    groups = {True: [], False: []}
    for d in dirs:
        syncs = []
        with open(f"{d}/postgres-server.log", errors="replace") as f:
            for line in f:
                m = SYNC.match(line)
                if m:
                    end = seconds(m.group(1).replace(" ", "T") + "+00:00")
                    syncs.append((end - float(m.group(2)), end))
        with open(f"{d}/postgres-collector.log", errors="replace") as f:
            for line in f:
                m = PERIOD.search(ANSI.sub("", line))
                if not m or float(m.group(4)) >= 20 or int(m.group(3)) < 50:
                    continue
                end, length = seconds(m.group(1)), float(m.group(2))
                hit = any(a < end and b > end - length for a, b in syncs)
                groups[hit].append((float(m.group(5)), float(m.group(6))))
    for hit, periods in groups.items():
        if not periods:
            continue
        commit = sorted(p[0] for p in periods)
        wait = sorted(p[1] for p in periods)
        p90 = int(0.9 * len(periods))
        print(
            f"{'with' if hit else 'without'} a checkpoint sync: {len(periods)} lane periods; "
            f"longest commit median {statistics.median(commit):.0f} ms, p90 {commit[p90]:.0f} ms; "
            f"longest wait median {statistics.median(wait):.0f} ms, p90 {wait[p90]:.0f} ms"
        )


if __name__ == "__main__":
    main(sys.argv[1:])

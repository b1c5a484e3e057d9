#!/usr/bin/env bash
# Wall time of `make run` from a clean runs directory (the virtual environment already built).
#
#     bash bench/make_run_time.sh
#
# An existing runs/ is moved aside to runs.before-make-run-<time>/ (never deleted), so that
# `make run` recomputes every step instead of skipping finished ones. The time goes to the screen
# and to runs/make_run_time.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -e runs ]; then
    aside="runs.before-make-run-$(date +%Y%m%d-%H%M%S)"
    mv runs "$aside"
    echo "moved the existing runs/ to $aside/"
fi
started=$(date +%s.%N)
make run 2>&1 | tee /tmp/make_run_time.log
ended=$(date +%s.%N)
seconds=$(python3 -c "print(round($ended - $started, 1))")
mkdir -p runs
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)
echo "make run: ${seconds} s wall ($(date -I), ${cpu}, $(nproc) cores)" | tee runs/make_run_time.txt

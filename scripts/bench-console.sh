#!/usr/bin/env bash
# The console benchmark (docs/benchmarks.md, "Console"): 10,000 runs in the database; the API's
# first pages (each filter, and the 100th page) and a cold load of the run list in headless
# Chromium, against a release build of `dayshift serve`. Figures go to docs/benchmarks.md by hand.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh up
# shellcheck disable=SC1091
. .dayshift/env
cargo build --release -p dayshift
DAYSHIFT_BIN="$PWD/target/release/dayshift" cargo nextest run -p dayshift-tests --test console \
  --run-ignored only --no-capture bench_the_run_list_with_10000_runs

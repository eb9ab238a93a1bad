#!/usr/bin/env bash
# The whole test suite: starts the local services (installing them where missing), then runs
# every test of the workspace against them with nextest, in parallel, from one build.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh up
scripts/services.sh drop-test-dbs
# shellcheck disable=SC1091
. .dayshift/env

if cargo nextest --version >/dev/null 2>&1; then
  exec cargo nextest run --workspace --no-fail-fast "$@"
else
  echo "cargo-nextest not found; falling back to cargo test" >&2
  exec cargo test --workspace --no-fail-fast "$@"
fi

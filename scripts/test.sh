#!/usr/bin/env bash
# The whole test suite: starts the local services (installing them where missing), then runs
# every test of the workspace against them with nextest, in parallel, from one build.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh up
scripts/services.sh clean-tests
# shellcheck disable=SC1091
. .dayshift/env
# The tests' scratch files (configs, manifests, browser profiles) go under .dayshift/tmp,
# emptied here, so that runs do not pile them up in /tmp.
rm -rf .dayshift/tmp
mkdir -p .dayshift/tmp
TMPDIR="$PWD/.dayshift/tmp"
export TMPDIR

if cargo nextest --version >/dev/null 2>&1; then
  exec cargo nextest run --workspace --no-fail-fast "$@"
else
  echo "cargo-nextest not found; falling back to cargo test" >&2
  exec cargo test --workspace --no-fail-fast "$@"
fi

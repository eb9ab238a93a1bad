#!/usr/bin/env bash
# dayshift end to end on this machine: starts PostgreSQL and Redis (installing them where
# missing), builds the binary, applies the migrations, starts the API and a worker, runs the
# self-test workflow (five steps, each failing once and retried) and shows its steps.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh up
# shellcheck disable=SC1091
. .dayshift/env
port=${DAYSHIFT_DEMO_PORT:-18080}
export DAYSHIFT_SERVER=http://127.0.0.1:$port

echo "== building dayshift"
cargo build -q -p dayshift
bin=target/debug/dayshift
mkdir -p .dayshift/logs

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

echo "== dayshift migrate"
$bin migrate
echo "== dayshift serve --listen 127.0.0.1:$port   (log: .dayshift/logs/serve.log)"
$bin serve --listen "127.0.0.1:$port" >.dayshift/logs/serve.log 2>&1 &
pids+=($!)
echo "== dayshift worker   (log: .dayshift/logs/worker.log)"
$bin worker >.dayshift/logs/worker.log 2>&1 &
pids+=($!)
for _ in $(seq 300); do
  grep -q "listening on" .dayshift/logs/serve.log 2>/dev/null && grep -q "started" .dayshift/logs/worker.log 2>/dev/null && break
  sleep 0.1
done

echo "== dayshift workflows"
$bin workflows
echo
echo "== dayshift run selftest.chain --wait"
$bin run selftest.chain --input '{"steps": 5, "sleep_ms": 100, "fail_first": 1}' --wait
echo
echo "== dayshift runs list"
$bin runs list --limit 5

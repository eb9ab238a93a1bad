#!/usr/bin/env bash
# dayshift end to end on this machine: starts PostgreSQL, Redis, SeaweedFS and OpenBao (installing
# them where missing), builds the binary, applies the migrations, starts the API and a worker,
# then runs the self-test workflow (five steps, each failing once and retried) and dayshift's main
# job: a backup of a database into SeaweedFS, a restore test of it, a snapshot of OpenBao, and the
# freshness metrics an alert rule watches.
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
# A config naming what the backups act on: a sample database, the SeaweedFS bucket, OpenBao.
demo_db=dayshift_demo_app
app_url=${DAYSHIFT_DATABASE_URL%/*}/$demo_db
psql -X -q "$DAYSHIFT_DATABASE_URL" -c "drop database if exists $demo_db" -c "create database $demo_db"
psql -X -q "$app_url" \
  -c "create table customers (id int primary key, name text not null)" \
  -c "insert into customers select i, 'customer ' || i from generate_series(1, 10000) i"
export DEMO_APP_URL=$app_url DEMO_SERVER_URL=$DAYSHIFT_DATABASE_URL
cat >.dayshift/demo.yaml <<EOF
connections:
  s3:
    backups:
      endpoint: $DAYSHIFT_S3_ENDPOINT
      bucket: dayshift-demo
      access-key: { env: DAYSHIFT_S3_ACCESS_KEY }
      secret-key: { env: DAYSHIFT_S3_SECRET_KEY }
  postgres:
    app: { url: { env: DEMO_APP_URL } }
    scratch-server: { url: { env: DEMO_SERVER_URL } }
  vault:
    openbao: { address: $DAYSHIFT_VAULT_ADDR, token: { file: $DAYSHIFT_VAULT_TOKEN_FILE } }
# What API callers may run (docs/security.md): the restore test's one query.
policy:
  workflows:
    backup.restore-test:
      inputs:
        "checks[].query": ["select count(*) from customers"]
EOF
export DAYSHIFT_CONFIG=.dayshift/demo.yaml
bin="$bin --config $DAYSHIFT_CONFIG"

$bin migrate
# The API wants a bearer token; the demo makes its own operator token (stored hashed).
$bin tokens revoke demo >/dev/null 2>&1 || true
DAYSHIFT_TOKEN=$($bin tokens create demo --role operator 2>/dev/null)
export DAYSHIFT_TOKEN
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
echo "== dayshift run backup.postgres --wait   (pg_dump | zstd → SeaweedFS, manifest, verified)"
$bin run backup.postgres --input '{"database": "app", "store": "backups"}' --wait
echo
echo "== dayshift run backup.restore-test --wait   (restored into a scratch database, checked, dropped)"
$bin run backup.restore-test --wait --input '{"store": "backups", "database": "app", "server": "scratch-server",
  "checks": [{"name": "customers", "query": "select count(*) from customers", "min": 10000}]}'
echo
echo "== dayshift run backup.vault --wait   (OpenBao raft snapshot → SeaweedFS)"
$bin run backup.vault --input '{"vault": "openbao", "store": "backups"}' --wait
echo
echo "== GET $DAYSHIFT_SERVER/metrics   (what deploy/prometheus/dayshift-backups.rules.yml alerts on)"
python3 -c "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())" \
  "$DAYSHIFT_SERVER/metrics" | grep -v '^#'
echo
echo "== dayshift runs list"
$bin runs list --limit 5
echo
# The console signs in with a token; the demo's is kept in a file readable only by you.
(umask 077 && printf '%s\n' "$DAYSHIFT_TOKEN" >.dayshift/demo-token)
echo "== the web console: $DAYSHIFT_SERVER/console/   (token: cat .dayshift/demo-token)"
if [ "${DAYSHIFT_DEMO_STAY:-}" = 1 ]; then
  echo "serve and the worker stay up until Ctrl-C"
  wait
else
  echo "   DAYSHIFT_DEMO_STAY=1 scripts/demo.sh keeps serve and the worker up to look at it"
fi

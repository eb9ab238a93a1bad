#!/usr/bin/env bash
# Backs up a 1 GiB PostgreSQL database with a release `dayshift worker` into SeaweedFS and
# reports the worker's peak RSS and the throughput, next to the baseline `pg_dump | zstd` into
# a local file. Figures go to docs/benchmarks.md by hand.
#
#   scripts/bench-backup.sh            # DAYSHIFT_BENCH_DB_MB=1024 by default
#
# The database (dayshift_bench_backup) is kept between runs, so only the first run pays for
# generating it; `dropdb` it to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

scripts/services.sh up
# shellcheck disable=SC1091
. .dayshift/env
command -v zstd >/dev/null || { sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd=sudo; $sudo_cmd apt-get install -y -qq zstd >/dev/null; }

size_mb=${DAYSHIFT_BENCH_DB_MB:-1024}
db=dayshift_bench_backup
server_url=$DAYSHIFT_DATABASE_URL
db_url=${server_url%/*}/$db
psql_() { psql -X -q -v ON_ERROR_STOP=1 "$@"; }

echo "== building dayshift (release)"
cargo build -q --release -p dayshift
bin=$root/target/release/dayshift

# ---------------------------------------------------------------- the database
have=$(psql_ -tA "$server_url" -c "select coalesce((select pg_database_size('$db') / 1048576 from pg_database where datname = '$db'), 0)")
if [ "$have" -lt "$size_mb" ]; then
  echo "== generating $db ($size_mb MiB; it has $have MiB)"
  psql_ "$server_url" -c "drop database if exists $db" -c "create database $db"
  psql_ "$db_url" <<'SQL'
create table customers (id int primary key, name text not null, email text not null, created date not null);
insert into customers
  select i, 'customer ' || i, 'c' || i || '@example.com', date '2015-01-01' + (i % 3650)
  from generate_series(1, 200000) i;
create table orders (
  id bigint primary key,
  customer int not null references customers(id),
  status text not null,
  amount numeric(12, 2) not null,
  created_at timestamptz not null,
  lines jsonb not null,
  note text
);
SQL
  batch=0
  while [ "$(psql_ -tA "$db_url" -c "select pg_database_size(current_database()) / 1048576")" -lt "$size_mb" ]; do
    psql_ "$db_url" -c "insert into orders
      select $batch * 500000 + i, 1 + (random() * 199999)::int,
             (array['new', 'paid', 'shipped', 'returned'])[1 + (i % 4)],
             round((random() * 1000)::numeric, 2),
             timestamptz '2020-01-01' + random() * interval '6 years',
             jsonb_build_object('sku', 'SKU-' || (random() * 10000)::int, 'qty', 1 + (i % 5),
                                'tags', jsonb_build_array(md5(random()::text), md5(random()::text))),
             case when i % 3 = 0 then md5(random()::text) || ' ' || md5(random()::text) end
      from generate_series(1, 500000) i"
    batch=$((batch + 1))
  done
  psql_ "$db_url" -c "create index orders_by_customer on orders (customer)" -c "vacuum analyze"
fi
db_bytes=$(psql_ -tA "$db_url" -c "select pg_database_size(current_database())")
pg_major=$(psql_ -tA "$db_url" -c "show server_version" | cut -d. -f1)
pg_dump=/usr/lib/postgresql/$pg_major/bin/pg_dump
echo "== database: $((db_bytes / 1048576)) MiB"

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# ---------------------------------------------------------------- baseline
echo "== baseline: pg_dump --format=custom --compress=0 | zstd -3 > file"
start=$(date +%s.%N)
"$pg_dump" --format=custom --compress=0 --dbname "$db_url" | zstd -3 -q -o "$work/baseline.dump.zst"
base_s=$(python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$start" "$(date +%s.%N)")
base_bytes=$(stat -c %s "$work/baseline.dump.zst")
rm -f "$work/baseline.dump.zst"

# ---------------------------------------------------------------- dayshift
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf '%s' "$DAYSHIFT_S3_ACCESS_KEY" >"$work/ak"
printf '%s' "$DAYSHIFT_S3_SECRET_KEY" >"$work/sk"
printf '%s' "$db_url" >"$work/db"
cat >"$work/dayshift.yaml" <<EOF
database: { url: $server_url }
redis: { url: $DAYSHIFT_REDIS_URL }
server: { listen: 127.0.0.1:$port }
queue: { name: "dayshift:bench-backup:$$" }
connections:
  s3:
    bench:
      endpoint: $DAYSHIFT_S3_ENDPOINT
      bucket: dayshift-bench
      access-key: { file: $work/ak }
      secret-key: { file: $work/sk }
  postgres:
    bench: { url: { file: $work/db } }
EOF
export DAYSHIFT_SERVER=http://127.0.0.1:$port
"$bin" --config "$work/dayshift.yaml" migrate >/dev/null
"$bin" --config "$work/dayshift.yaml" tokens revoke bench >/dev/null 2>&1 || true
DAYSHIFT_TOKEN=$("$bin" --config "$work/dayshift.yaml" tokens create bench --role operator 2>/dev/null)
export DAYSHIFT_TOKEN
"$bin" --config "$work/dayshift.yaml" serve >"$work/serve.log" 2>&1 &
pids+=($!)
"$bin" --config "$work/dayshift.yaml" worker >"$work/worker.log" 2>&1 &
worker=$!
pids+=($worker)
for _ in $(seq 300); do
  grep -q "listening on" "$work/serve.log" && grep -q "started" "$work/worker.log" && break
  sleep 0.1
done
idle_kib=$(awk '/VmHWM/ {print $2}' "/proc/$worker/status")
# CPU seconds (user + system) a process has used; the machine's two cores are shared by all.
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"; }
weed=$(cat .dayshift/seaweedfs/weed.pid)
worker_cpu0=$(cpu_s "$worker") weed_cpu0=$(cpu_s "$weed")

echo "== dayshift: backup.postgres by a release worker"
"$bin" --config "$work/dayshift.yaml" run backup.postgres --json --wait \
  --input '{"database": "bench", "store": "bench", "prefix": "bench"}' >"$work/run.json"
peak_kib=$(awk '/VmHWM/ {print $2}' "/proc/$worker/status")
worker_cpu=$(python3 -c "import sys; print(float(sys.argv[1]) - float(sys.argv[2]))" "$(cpu_s "$worker")" "$worker_cpu0")
weed_cpu=$(python3 -c "import sys; print(float(sys.argv[1]) - float(sys.argv[2]))" "$(cpu_s "$weed")" "$weed_cpu0")
python3 - "$work/run.json" "$db_bytes" "$base_s" "$base_bytes" "$peak_kib" "$idle_kib" "$worker_cpu" "$weed_cpu" <<'PY'
import json, sys
from datetime import datetime
run = json.load(open(sys.argv[1]))
db_bytes, base_s, base_bytes, peak_kib, idle_kib, worker_cpu, weed_cpu = (float(a) for a in sys.argv[2:])
if run["status"] != "succeeded":
    sys.exit(f"the backup run {run['status']}: {run.get('error')}")
t = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))
run_s = (t(run["finished_at"]) - t(run["started_at"])).total_seconds()
steps = {s["name"]: s["duration_ms"] / 1000 for s in run["steps"]}
mib = lambda b: b / 1048576
print(f"""
database size (pg_database_size):  {mib(db_bytes):.0f} MiB
baseline pg_dump | zstd -3 > file: {base_s:.1f} s, {mib(db_bytes) / base_s:.1f} MiB/s of database, file {mib(base_bytes):.1f} MiB
dayshift backup.postgres run:      {run_s:.1f} s, {mib(db_bytes) / run_s:.1f} MiB/s of database, object {mib(run['output']['size']):.1f} MiB
  of which dump-and-upload:        {steps['dump-and-upload']:.1f} s, {mib(db_bytes) / steps['dump-and-upload']:.1f} MiB/s
  of which verify (read back):     {steps['verify']:.1f} s
worker peak RSS (VmHWM):           {peak_kib / 1024:.1f} MiB (idle before the run: {idle_kib / 1024:.1f} MiB)
CPU during the run:                worker {worker_cpu:.1f} s (zstd, sha256, HTTP), SeaweedFS {weed_cpu:.1f} s
""")
PY

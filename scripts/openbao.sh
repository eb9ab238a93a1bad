#!/usr/bin/env bash
# Starts or stops an OpenBao server with integrated (raft) storage: the storage production
# Vault/OpenBao clusters run, and the one `sys/storage/raft/snapshot` needs (dev mode keeps
# everything in memory and has no snapshots).
#
#   scripts/openbao.sh start DIR PORT   start (init and unseal on first start); ready on return
#   scripts/openbao.sh stop DIR
#
# DIR holds the data, the log, the pid and init.json (the unseal key and root token, which is
# why DIR must stay local and private). The API listens on 127.0.0.1:PORT, the cluster on PORT+1.
# The `bao` binary is taken from $DAYSHIFT_BAO, else the checkout's virtualenv.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bao=${DAYSHIFT_BAO:-$root/.dayshift/venv/bin/bao}

log() { printf 'openbao: %s\n' "$*" >&2; }
# shellcheck source=scripts/lib.sh
. "$root/scripts/lib.sh"

json_field() {
  # json_field FILE EXPR: prints a field of a JSON file (EXPR indexes `d`).
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print($2)" "$1"
}

start() {
  local dir=$1 port=$2
  mkdir -p "$dir/data"
  chmod 700 "$dir"
  export BAO_ADDR="http://127.0.0.1:$port"
  cat >"$dir/config.hcl" <<EOF
storage "raft" {
  path    = "$dir/data"
  node_id = "dayshift-local"
}
listener "tcp" {
  address         = "127.0.0.1:$port"
  cluster_address = "127.0.0.1:$((port + 1))"
  tls_disable     = true
}
api_addr      = "http://127.0.0.1:$port"
cluster_addr  = "http://127.0.0.1:$((port + 1))"
disable_mlock = true
ui            = false
EOF
  if [ -f "$dir/bao.pid" ] && kill -0 "$(cat "$dir/bao.pid")" 2>/dev/null; then
    log "already running on $BAO_ADDR"
  else
    nohup "$bao" server -config="$dir/config.hcl" >"$dir/bao.log" 2>&1 &
    echo $! >"$dir/bao.pid"
  fi
  # `bao status` exits 0 when unsealed, 2 when sealed, 1 when it cannot tell.
  local code=1
  for _ in $(seq 100); do
    code=0
    "$bao" status >/dev/null 2>&1 || code=$?
    [ "$code" != 1 ] && break
    kill -0 "$(cat "$dir/bao.pid")" 2>/dev/null || { log "exited; see $dir/bao.log"; tail -5 "$dir/bao.log" >&2; return 1; }
    sleep 0.1
  done
  [ "$code" = 1 ] && { log "did not answer on $BAO_ADDR; see $dir/bao.log"; return 1; }
  if [ ! -s "$dir/init.json" ]; then
    "$bao" operator init -key-shares=1 -key-threshold=1 -format=json >"$dir/init.json.tmp"
    mv "$dir/init.json.tmp" "$dir/init.json"
    chmod 600 "$dir/init.json"
  fi
  if [ "$code" = 2 ] || ! "$bao" status >/dev/null 2>&1; then
    "$bao" operator unseal "$(json_field "$dir/init.json" 'd["unseal_keys_b64"][0]')" >/dev/null
  fi
  # Ready once the single raft node has become the active node.
  export BAO_TOKEN
  BAO_TOKEN=$(json_field "$dir/init.json" 'd["root_token"]')
  for _ in $(seq 100); do
    if "$bao" read -format=json sys/leader 2>/dev/null | grep -q '"is_self": true'; then
      return 0
    fi
    sleep 0.1
  done
  log "unsealed but not active; see $dir/bao.log"
  return 1
}

stop() {
  local dir=$1
  stop_pidfile "$dir/bao.pid"
}

case "${1:-}" in
  start) start "$2" "$3" ;;
  stop) stop "$2" ;;
  *) echo "usage: $0 start DIR PORT | stop DIR" >&2; exit 2 ;;
esac

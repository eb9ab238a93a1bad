#!/usr/bin/env bash
# Does tracing cost run speed, and does a collector that is down slow runs down?
#
# Runs `dayshift bench` (2 worker processes, selftest.chain runs) three times with a release
# build: traces off; traces to a live OTLP/HTTP endpoint (a minimal receiver that accepts and
# discards, as a collector's receiver answers); traces to an endpoint nobody listens on. The
# workers take the endpoint from OTEL_EXPORTER_OTLP_ENDPOINT. Prints each bench's report.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh up >/dev/null
# shellcheck disable=SC1091
. .dayshift/env
cargo build --release -q -p dayshift
bin=target/release/dayshift
runs=${BENCH_RUNS:-1000}
latency_runs=${BENCH_LATENCY_RUNS:-100}

live_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
dead_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
received=$(mktemp)
python3 - "$live_port" "$received" <<'PY' &
import http.server, sys
port, out = int(sys.argv[1]), sys.argv[2]
total = [0, 0]
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        n = int(self.headers.get("content-length", 0))
        self.rfile.read(n)
        total[0] += 1; total[1] += n
        open(out, "w").write(f"{total[0]} requests, {total[1]} bytes\n")
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
PY
receiver=$!
trap 'kill $receiver 2>/dev/null || true; rm -f "$received"' EXIT

for variant in off live down; do
  case $variant in
    off) endpoint="" ;;
    live) endpoint="http://127.0.0.1:$live_port" ;;
    down) endpoint="http://127.0.0.1:$dead_port" ;;
  esac
  echo "== traces $variant ${endpoint:+($endpoint)}"
  OTEL_EXPORTER_OTLP_ENDPOINT=$endpoint "$bin" bench --runs "$runs" --latency-runs "$latency_runs" 2>/dev/null |
    grep -E '^\| (W1: wall time|W1: runs/s|W1: steps/s|W2: end-to-end|W2: pick-up)'
  if [ "$variant" = live ]; then echo "receiver: $(cat "$received")"; fi
done

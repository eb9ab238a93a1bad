# Shell functions shared by the scripts; sourced, never run.

stop_pidfile() {
  # Stops the process named in pid file $1 and waits for it to be gone (killing it after 30 s),
  # so that a start right after finds its ports free.
  local file=$1 pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 150); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

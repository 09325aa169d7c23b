#!/usr/bin/env bash
# Stop the local Ray head started by cluster/start_head.sh (the one on GCS_PORT, default 6379),
# with its workers and agents — and nothing else: not `ray stop`, which stops every Ray process of
# this user (other heads, the private clusters of running jobs and tests).
#
#   cluster/stop_head.sh             # GRACE_S (default 10) seconds of SIGTERM per stage, then SIGKILL
#
# The head is known by its session and node id, recorded by start_head.sh (or read from the command
# line of the GCS listening on GCS_PORT): its processes are this user's processes that carry one of
# them in a --flag=value argument (GCS, raylet, dashboard, monitors, Ray Client server), and their
# descendants (workers, agents, dashboard modules). Like `ray stop`: raylet first, GCS last.
set -euo pipefail
GCS_PORT="${GCS_PORT:-6379}"
GRACE_S="${GRACE_S:-10}"
uid="$(id -u)"
state_dir="${RAY_TMPDIR:-${TMPDIR:-/tmp}}/ray"
state="$state_dir/mythos_head_${uid}_$GCS_PORT"

session="" node_id=""
if [ -f "$state" ] && [ -O "$state" ]; then
  session="$(sed -n 's/^session=\(session_[A-Za-z0-9_.-]*\)$/\1/p' "$state")"
  node_id="$(sed -n 's/^node_id=\([0-9a-f]*\)$/\1/p' "$state")"
fi
if [ -z "$session" ]; then
  gcs_args="$(ps -ww -u "$uid" -o args= | grep -e "gcs_server .*--gcs_server_port=$GCS_PORT\( \|$\)" | grep -v grep | head -n 1 || true)"
  session="$(sed -n 's/.*--session-name=\([^ ]*\).*/\1/p' <<<"$gcs_args")"
  node_id="$(sed -n 's/.*--node-id=\([^ ]*\).*/\1/p' <<<"$gcs_args")"
fi
if [ -z "$session" ]; then
  echo "no Ray head of this user on port $GCS_PORT" >&2
  rm -f "$state"
  exit 0
fi

# "PID KIND" for every process of the head; KIND is raylet, gcs or other
head_procs() {
  ps -ww -u "$uid" -o pid=,ppid=,args= | SESSION="$session" NODE_ID="$node_id" SELF="$$" awk '
    {
      pid = $1; parent[pid] = $2; args = ""
      for (i = 3; i <= NF; i++) {
        args = args " " $i
        if ($i ~ /^--[A-Za-z_-]+=/ && (index($i, ENVIRON["SESSION"]) || (ENVIRON["NODE_ID"] != "" && index($i, ENVIRON["NODE_ID"]))))
          mark[pid] = 1
      }
      cmd[pid] = args
    }
    END {
      do { changed = 0
           for (p in parent) if (!(p in mark) && (parent[p] in mark)) { mark[p] = 1; changed = 1 } } while (changed)
      for (p in mark) {
        if (p == ENVIRON["SELF"]) continue
        kind = "other"
        if (cmd[p] ~ /\/raylet\/raylet( |$)/) kind = "raylet"
        else if (cmd[p] ~ /\/gcs\/gcs_server( |$)/) kind = "gcs"
        print p, kind
      }
    }'
}

stop_stage() {  # stop_stage KIND...: SIGTERM, wait up to GRACE_S, then SIGKILL
  local pids=() pid kind k
  while read -r pid kind; do
    for k in "$@"; do [ "$kind" = "$k" ] && pids+=("$pid"); done
  done < <(head_procs)
  [ "${#pids[@]}" -gt 0 ] || return 0
  kill -TERM "${pids[@]}" 2>/dev/null || true
  local alive=("${pids[@]}") waited=0
  while [ "${#alive[@]}" -gt 0 ] && [ "$waited" -lt $((GRACE_S * 5)) ]; do
    sleep 0.2
    waited=$((waited + 1))
    local still=()
    for pid in "${alive[@]}"; do kill -0 "$pid" 2>/dev/null && still+=("$pid"); done
    alive=("${still[@]+"${still[@]}"}")
  done
  [ "${#alive[@]}" -eq 0 ] || kill -KILL "${alive[@]}" 2>/dev/null || true
}

echo "stopping the Ray head on 127.0.0.1:$GCS_PORT ($session)" >&2
stop_stage raylet
stop_stage other
stop_stage gcs
stop_stage raylet other gcs  # anything started meanwhile
rm -f "$state"
# `ray.init(address="auto")` reads the last `ray start` address from here; drop it if it is this head
if grep -qx "127.0.0.1:$GCS_PORT" "$state_dir/ray_current_cluster" 2>/dev/null; then
  rm -f "$state_dir/ray_current_cluster"
fi
echo "stopped" >&2

#!/usr/bin/env bash
# Start a local Ray head for `ray job submit`, every port on 127.0.0.1 (GCS, raylet, workers,
# dashboard, job server, agents, metrics, Ray Client server).
#
#   cluster/start_head.sh                 # NUM_CPUS defaults to all cores, GCS_PORT to 6379,
#                                         # DASHBOARD_PORT to 8265, AGENT_PORT (dashboard agent HTTP,
#                                         # the job server's) to 52365, CLIENT_PORT (Ray Client) to 10001
#   eval "$(cluster/start_head.sh --print-env)"   # start, then export the addresses into this shell
#   ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/debug.yaml
#   cluster/stop_head.sh                  # stops this head only (same GCS_PORT)
#
# Ray turns --node-ip-address=127.0.0.1 into the machine's outward address, and then binds its gRPC
# servers on all interfaces, unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; with it the node IP stays
# 127.0.0.1 and every server binds loopback. Clients of this head need it too (Ray would otherwise
# dial 127.0.0.1:GCS_PORT at the outward address): --print-env exports it.
#
# Ray >= 2.5x enables token authentication for new local clusters; this script turns it on
# explicitly (RAY_AUTH_MODE=token, token in ~/.ray/auth_token, created on first start, mode 0600)
# so that the CLI, the job server and `ray.init` agree.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
RAY_BIN="${RAY_BIN:-$( [ -x "$root/.venv/bin/ray" ] && echo "$root/.venv/bin/ray" || echo ray )}"
NUM_CPUS="${NUM_CPUS:-$(nproc)}"
GCS_PORT="${GCS_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
AGENT_PORT="${AGENT_PORT:-52365}"
CLIENT_PORT="${CLIENT_PORT:-10001}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0

print_env=0
[ "${1:-}" = "--print-env" ] && print_env=1

# the token file: created with mode 0600 (Ray would write it with the umask, usually 0644), and an
# existing one of this user made owner-only
if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ]; then
  token_file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
  if [ -z "${RAY_AUTH_TOKEN_PATH:-}" ] && [ ! -s "$token_file" ]; then
    (umask 077 && mkdir -p "$(dirname "$token_file")" && "$RAY_BIN" get-auth-token --generate >/dev/null)
  fi
  if [ -O "$token_file" ]; then chmod go-rwx "$token_file"; fi
fi

"$RAY_BIN" start --head \
  --node-ip-address=127.0.0.1 --port="$GCS_PORT" \
  --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --include-dashboard=true \
  --dashboard-agent-listen-port="$AGENT_PORT" --ray-client-server-port="$CLIENT_PORT" \
  --num-cpus="$NUM_CPUS" --disable-usage-stats >&2

# record which head this is (its session and node id, from its GCS) so that cluster/stop_head.sh
# stops this head's processes and no other Ray of this user
gcs_args="$(ps -ww -u "$(id -u)" -o args= | grep -e "gcs_server .*--gcs_server_port=$GCS_PORT\( \|$\)" | grep -v grep | head -n 1 || true)"
session="$(sed -n 's/.*--session-name=\([^ ]*\).*/\1/p' <<<"$gcs_args")"
node_id="$(sed -n 's/.*--node-id=\([^ ]*\).*/\1/p' <<<"$gcs_args")"
state_dir="${RAY_TMPDIR:-${TMPDIR:-/tmp}}/ray"
if [ -n "$session" ]; then
  printf 'session=%s\nnode_id=%s\n' "$session" "$node_id" >"$state_dir/mythos_head_$(id -u)_$GCS_PORT"
else
  echo "warning: could not find the GCS of the head on port $GCS_PORT; stop_head.sh will look for it again" >&2
fi

# the job server answers before its job agent has registered ("No available agent to submit
# job"): wait until a no-op job is accepted
ready=0
for _ in $(seq 1 40); do
  if RAY_API_SERVER_ADDRESS="http://127.0.0.1:$DASHBOARD_PORT" "$RAY_BIN" job submit --no-wait \
       --submission-id "mythos-head-ready-$(date +%s%N)" -- true >/dev/null 2>&1; then
    ready=1
    break
  fi
  sleep 1
done
[ "$ready" = 1 ] || { echo "the Ray job server did not become ready" >&2; exit 1; }

env_lines="export RAY_AUTH_MODE=$RAY_AUTH_MODE
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
export RAY_ADDRESS=127.0.0.1:$GCS_PORT"
if [ "$print_env" = 1 ]; then
  echo "$env_lines"
else
  echo "Ray head running on 127.0.0.1 (dashboard http://127.0.0.1:$DASHBOARD_PORT). In your shell:" >&2
  echo "$env_lines" >&2
fi

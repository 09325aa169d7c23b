#!/usr/bin/env bash
# Start a local Ray head for `ray job submit`, bound to 127.0.0.1 (GCS, dashboard and job server).
#
#   cluster/start_head.sh                 # NUM_CPUS defaults to all cores, DASHBOARD_PORT to 8265
#   eval "$(cluster/start_head.sh --print-env)"   # start, then export the addresses into this shell
#   ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/debug.yaml
#   cluster/stop_head.sh
#
# Ray >= 2.5x enables token authentication for new local clusters; this script turns it on
# explicitly (RAY_AUTH_MODE=token, token in ~/.ray/auth_token, created on first start) so
# that the CLI, the job server and `ray.init` agree.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
RAY_BIN="${RAY_BIN:-$( [ -x "$root/.venv/bin/ray" ] && echo "$root/.venv/bin/ray" || echo ray )}"
NUM_CPUS="${NUM_CPUS:-$(nproc)}"
GCS_PORT="${GCS_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"

print_env=0
[ "${1:-}" = "--print-env" ] && print_env=1

"$RAY_BIN" start --head \
  --node-ip-address=127.0.0.1 --port="$GCS_PORT" \
  --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --include-dashboard=true \
  --num-cpus="$NUM_CPUS" --disable-usage-stats >&2

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
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
export RAY_ADDRESS=127.0.0.1:$GCS_PORT"
if [ "$print_env" = 1 ]; then
  echo "$env_lines"
else
  echo "Ray head running on 127.0.0.1 (dashboard http://127.0.0.1:$DASHBOARD_PORT). In your shell:" >&2
  echo "$env_lines" >&2
fi

#!/usr/bin/env bash
# Stop the local Ray head started by cluster/start_head.sh (and every Ray process of this user).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
RAY_BIN="${RAY_BIN:-$( [ -x "$root/.venv/bin/ray" ] && echo "$root/.venv/bin/ray" || echo ray )}"
"$RAY_BIN" stop --force >&2

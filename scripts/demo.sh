#!/usr/bin/env bash
# Quick start, command 1: set up a venv (once) and run the main job, `pnc demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled
VENV="${PNC_VENV:-.venv}"
if [ ! -x "$VENV/bin/pnc" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet -e '.[full]' 2>&1 | grep -v -i "^warning" || true
fi
exec "$VENV/bin/pnc" demo "$@"

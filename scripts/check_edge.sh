#!/usr/bin/env bash
# CI: the edge client in a venv with only the base install (no torch, no ray), against a
# real receiver started from the full venv.
#   bash scripts/check_edge.sh ZOO_DIR PACKAGE.pnc
# Sends the package, checks `pnc status` says verified, predicts one image, fetches the
# package back and compares digests.
set -euo pipefail
cd "$(dirname "$0")/.."
zoo="$1" package="$2"
work="$(mktemp -d)"
receiver_pid=""
cleanup() { [ -n "$receiver_pid" ] && kill "$receiver_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

python3 -m venv "$work/edge"
"$work/edge/bin/pip" install --quiet . 2>&1 | grep -v -i "^warning" || true
edge="$work/edge/bin"
"$edge/python" -c "import importlib.util as u; bad = [m for m in ('torch', 'ray') if u.find_spec(m)]
assert not bad, f'the edge venv has {bad}'"
"$edge/pnc" --help >/dev/null

pnc receiver serve --listen 127.0.0.1:0 --zoo "$zoo" --store "$work/store" --token edge-t \
  > "$work/receiver.out" 2> "$work/receiver.log" &
receiver_pid=$!
for _ in $(seq 1 240); do grep -q "port=" "$work/receiver.out" 2>/dev/null && break; sleep 0.5; done
port="$(grep -o 'port=[0-9]*' "$work/receiver.out" | head -n 1 | cut -d= -f2)"
[ -n "$port" ] || { cat "$work/receiver.log"; echo "receiver did not start"; exit 1; }
addr="127.0.0.1:$port"

id="$("$edge/pnc" send "$package" --to "$addr" --token edge-t --json | "$edge/python" -c \
  'import json, sys; r = json.load(sys.stdin); assert r["state"] == "verified", r; print(r["id"])')"
"$edge/pnc" status --from "$addr" --token edge-t --json | "$edge/python" -c \
  'import json, sys; r = json.load(sys.stdin); assert [p["state"] for p in r["packages"]] == ["verified"], r'
"$edge/python" -c 'import numpy as np, sys; np.save(sys.argv[1], np.zeros((28, 28), np.uint8))' \
  "$work/digit.npy"
"$edge/pnc" predict "$work/digit.npy" --from "$addr" --token edge-t --package "${id:0:12}" --json \
  | "$edge/python" -c 'import json, sys; r = json.load(sys.stdin); assert len(r["predictions"]) == 1, r'
"$edge/pnc" fetch "${id:0:12}" --from "$addr" --token edge-t --out "$work/copy.pnc" >/dev/null
cmp "$package" "$work/copy.pnc"
set +e
"$edge/pnc" status --from 127.0.0.1:9 >/dev/null 2>&1
rc=$?
set -e
[ "$rc" -eq 7 ] || { echo "edge pnc status of a dead address exited $rc, not 7"; exit 1; }
echo "edge client (no torch, no ray): send -> verified, status, predict, fetch identical: ok"

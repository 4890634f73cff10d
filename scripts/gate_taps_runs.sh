#!/usr/bin/env bash
# `pnc clone --gate-taps early|all` on the bench's k_t = 20 cells (issue 14 / 10), paired
# with their PNC rows by scripts/compare_gate_taps.py. Two 1-thread clones at a time, about
# 9 minutes a --gate-taps value on 2 cores. The zoos are the bench's: /tmp/pnc/zoo0..2
# (`pnc zoo build --seed N --zoo /tmp/pnc/zooN`) and /tmp/pnc/rgbzoo (`--set rgb`).
#
#   bash scripts/gate_taps_runs.sh all OUT_DIR && bash scripts/gate_taps_runs.sh early OUT_DIR
#   bash scripts/gate_taps_runs.sh all OUT_DIR half   # --gate-features half (the default)
#   python scripts/compare_gate_taps.py OUT_DIR
set -euo pipefail
taps=${1:?usage: gate_taps_runs.sh early|all OUT_DIR [FEATURES]}
out=${2:?usage: gate_taps_runs.sh early|all OUT_DIR [FEATURES]}
features=${3:-all}  # --gate-features; runs are named by the taps, then -FEATURES unless all
label=$taps$([ "$features" = all ] || echo "-$features")
read -r -a extra <<< "${PNC_CLONE_ARGS:-}"  # more `pnc clone` flags, e.g. --no-gate-stand-ins
pnc=${PNC:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/pnc}
mkdir -p "$out"
export OMP_NUM_THREADS=1

one() {  # name zoo target source positions seed data
  "$pnc" clone --zoo "$2" --data "$7" --target "$3" --source "$4" --classes 5,6 \
    --per-class 20 --target-per-class 20 --seed "$6" --positions "$5" --gate-taps "$taps" \
    --gate-features "$features" "${extra[@]}" --out "$out/$1_$label.pnc" --json > "$out/$1_$label.json"
}
mnist() { one "mnist_z$1_s$2" "/tmp/pnc/zoo$1" mnist-cnn-0to4 mnist-cnn-5to9 3:3,4:4 "$2" mnist; }
mob() { one "mob_s$1" /tmp/pnc/rgbzoo rgb-resnet18-0to4 rgb-mobilenet_v3_small-5to9 7:7,6:7 "$1" rgb-digits; }
vit() { one "vit_s$1" /tmp/pnc/rgbzoo rgb-resnet18-0to4 rgb-vit-5to9 9:6,8:6 "$1" rgb-digits; }

(for z in 0 1 2; do mnist "$z" 0; mnist "$z" 1; done; for s in 0 1 2; do mob "$s"; done) &
(for z in 0 1 2; do mnist "$z" 2; done; for s in 0 1 2; do vit "$s"; done) &
wait

#!/usr/bin/env bash
# Issue 2's clone targets on two idle, pinned CPU cores of the lent machine (GPU hidden):
#   bash scripts/cpu2_clone.sh   (carry .gpu/, see scripts/gpu_check.sh)
set -euo pipefail
mkdir -p /tmp/pnc_site
[ -f /tmp/pnc_site/ray/__init__.py ] || tar -xJf .gpu/carry/site.tar.xz -C /tmp/pnc_site
export PYTHONPATH="/tmp/pnc_site:$PWD" PYTHONUNBUFFERED=1
nproc; lscpu | grep -m1 "Model name" || true
CUDA_VISIBLE_DEVICES= taskset -c 0,1 python3 bench/bench_clone.py --zoo .gpu/zoo --threads 2 \
  --tasks "${1:-default,hetero,kt0}" | tee "${OUT:-/tmp}/bench_clone.jsonl"

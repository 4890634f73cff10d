"""Benchmark: position search on Ray actors against the in-process sequential search.

Targets (issue 4), measured side by side in one run on this machine:

* position search over >= 4 candidates with 2 actors on 2 CPU cores: wall time
  <= 0.65 x the in-process sequential search (torch threads as given by --threads);
* Ray overhead on a one-candidate clone job (joining a running cluster) <= 10 s.

``--gpu`` runs the same search with ``num_gpus=1`` actors and with CPU actors and
prints the speed-up (``scripts/gpu_check.sh`` runs it on a GPU machine).

Usage::

    PNC_ZOO=/tmp/zoo1 python bench/bench_ray.py                # CPU targets
    PNC_ZOO=/tmp/zoo1 python bench/bench_ray.py --gpu --json   # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from pnc_net.cloning import (
    CloneConfig,
    clone,
    localize_module,
    plan,
    prepare_module,
    run_sequential,
)
from pnc_net.cluster import ClusterConfig, RayRunner
from pnc_net.data import load_mnist
from pnc_net.search import best_candidate
from pnc_net.zoo import Zoo

SEARCH_POSITIONS = ((2, 2), (3, 3), (3, 4), (4, 4))
SEARCH_TARGET, OVERHEAD_TARGET_S = 0.65, 10.0


def task(positions, per_class: int = 40) -> CloneConfig:
    return CloneConfig.single("mnist-cnn-0to4", "mnist-cnn-5to9", ("5", "6"),
                              per_class=per_class, target_per_class=10, positions=positions)


def prepared_job(zoo, data, cfg):
    """A job with module 0 localized and prepared: what the position search starts from."""
    job = plan(zoo, data, cfg)
    job.modules[0].masks = localize_module(job, 0)
    job.modules[0].prepared = prepare_module(job, 0)
    return job


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def start_cluster(num_cpus: int, num_gpus: int | None = None) -> float:
    import ray

    seconds, _ = timed(lambda: ray.init(
        num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
        _node_ip_address="127.0.0.1", logging_level=logging.WARNING))
    return seconds


def search_on(job, cluster: ClusterConfig, repeats: int = 1) -> tuple[list[float], list,
                                                                      list[dict]]:
    """Position search on fresh actors, ``repeats`` times: the first run pays for shipping
    the weights (and CUDA's start on a GPU), later runs find them cached."""
    with RayRunner(cluster) as runner:
        runner.worker_info()  # actors up (process start is paid once per pool, not per job)
        times = []
        for _ in range(repeats):
            seconds, results = timed(lambda: runner(job, 0, list(SEARCH_POSITIONS)))
            times.append(seconds)
        return times, results, runner.worker_info()


def cpu_targets(zoo, data, threads: int, repeats: int) -> dict:
    """Sequential and Ray searches alternate ``repeats`` times (other load on the machine
    hits both alike); the ratio compares the fastest of each."""
    torch.set_num_threads(threads)
    job = prepared_job(zoo, data, task(SEARCH_POSITIONS))
    ray_start_s = start_cluster(num_cpus=2)
    seq_s, ray_s = [], []
    with RayRunner(ClusterConfig(num_workers=2)) as runner:
        runner.worker_info()  # actor processes up
        for _ in range(repeats):
            seconds, seq = timed(lambda: run_sequential(job, 0, list(SEARCH_POSITIONS)))
            seq_s.append(seconds)
            seconds, par = timed(lambda: runner(job, 0, list(SEARCH_POSITIONS)))
            ray_s.append(seconds)
        workers = runner.worker_info()
    same_best = best_candidate([(p, r) for p, (_, r) in zip(SEARCH_POSITIONS, seq)]) == \
        best_candidate([(p, r) for p, (_, r) in zip(SEARCH_POSITIONS, par)])
    one = task(((4, 4),))
    in_proc_s, _ = timed(lambda: clone(zoo, data, one))
    with RayRunner(ClusterConfig(num_workers=1)) as runner:  # fresh actor, cold caches
        ray_one_s, _ = timed(lambda: clone(zoo, data, one, runner=runner))
    return {
        "candidates": len(SEARCH_POSITIONS), "in_process_threads": threads,
        "sequential_search_s": seq_s, "ray_search_s": ray_s, "ratio": min(ray_s) / min(seq_s),
        "ratio_target": SEARCH_TARGET, "same_best": same_best,
        "workers": [{k: w[k] for k in ("pid", "model_loads", "threads")} for w in workers],
        "ray_cluster_start_s": ray_start_s, "one_candidate_in_process_s": in_proc_s,
        "one_candidate_ray_s": ray_one_s, "ray_overhead_s": ray_one_s - in_proc_s,
        "overhead_target_s": OVERHEAD_TARGET_S,
        "load_average_1m": os.getloadavg()[0],  # other work on the machine skews every figure
    }


def gpu_speedup(zoo, data) -> dict:
    import ray

    cpus = os.cpu_count() or 1
    torch.set_num_threads(cpus)
    job = prepared_job(zoo, data, task(SEARCH_POSITIONS))
    seq_s, _ = timed(lambda: run_sequential(job, 0, list(SEARCH_POSITIONS)))
    start_s = start_cluster(num_cpus=cpus, num_gpus=torch.cuda.device_count())
    gpu_s, _, gpu_workers = search_on(job, ClusterConfig(use_gpu=True), repeats=2)
    packed_s, _, packed = search_on(job, ClusterConfig(use_gpu=True, gpus_per_worker=0.25),
                                    repeats=2)
    n_cpu = min(len(SEARCH_POSITIONS), cpus)
    cpu_s, _, _ = search_on(job, ClusterConfig(use_gpu=False, num_workers=n_cpu,
                                               torch_threads=max(1, cpus // n_cpu)), repeats=2)
    ray.shutdown()
    return {"device": torch.cuda.get_device_name(0), "cpus": cpus,
            "candidates": len(SEARCH_POSITIONS), "ray_cluster_start_s": start_s,
            "gpu_actors": len(gpu_workers), "gpu_workers": gpu_workers,
            "gpu_search_s": gpu_s, "gpu_packed_actors": len(packed), "gpu_packed_search_s": packed_s,
            "speedup_packed_vs_cpu_actors_warm": min(cpu_s) / min(packed_s), "cpu_actors": n_cpu, "cpu_search_s": cpu_s,
            "in_process_sequential_s": seq_s,
            "speedup_vs_cpu_actors_warm": min(cpu_s) / min(gpu_s),
            "speedup_vs_cpu_actors_first": cpu_s[0] / gpu_s[0],
            "speedup_vs_in_process_warm": seq_s / min(gpu_s)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", default=os.environ.get("PNC_ZOO"), help="zoo folder")
    parser.add_argument("--gpu", action="store_true", help="GPU actors vs CPU actors")
    parser.add_argument("--threads", type=int, default=1, help=(
        "in-process torch threads (1 = what each actor gets, so both paths compute the same "
        "floats and pick the same best position)"))
    parser.add_argument("--repeats", type=int, default=2, help="alternating search runs")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    zoo, data = Zoo(args.zoo), load_mnist()
    if args.gpu:
        out = gpu_speedup(zoo, data)
    else:
        out = cpu_targets(zoo, data, args.threads, args.repeats)
        import ray

        ray.shutdown()
    if args.json:
        print(json.dumps(out, sort_keys=True, default=float))
    else:
        for k, v in out.items():
            print(f"{k:28s} {v:.2f}" if isinstance(v, float) else f"{k:28s} {v}")
    if not args.gpu:
        ok = out["ratio"] <= SEARCH_TARGET and out["ray_overhead_s"] <= OVERHEAD_TARGET_S
        print(f"targets {'met' if ok else 'NOT met'}: search ratio {out['ratio']:.2f} "
              f"(<= {SEARCH_TARGET}), one-candidate overhead {out['ray_overhead_s']:.1f} s "
              f"(<= {OVERHEAD_TARGET_S:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: one clone per task on the CPU, on a GPU, and through Ray GPU actors.

Tasks (random init unless the zoo holds the trained rgb set; synthetic inputs
for the large one, so nothing needs a download):

* ``rgb18``: torchvision resnet18 (classes 0-4) <- mobilenet_v3_small (5-9) on the
  embedded colour digits, 3x32x32 (``rgb-resnet18-0to4`` / ``rgb-mobilenet_v3_small-5to9``
  from ``--zoo`` when it has them);
* ``r50``: torchvision resnet50 <- resnet50 at 3x224x224 on seeded random images,
  with small budgets (one position, few steps): the size where a GPU should pay.

Modes: ``cpu`` and ``cuda`` in process (``--device``), ``cuda-bf16`` (``--precision
bf16``), ``ray-gpu`` (one ``num_gpus=1`` CloneWorker on a local Ray cluster; the
driver plans on the CPU). Each case runs in its own process, so its peak memory is
its own: wall seconds, peak RSS, and on a GPU ``torch.cuda.max_memory_allocated``
(for Ray, the worker's). The fingerprint of every package is compared with the CPU
one (``fp_diff_vs_cpu``: max absolute probability difference; the receiver's
default tolerance is in ``pnc_net/rebuild.py``).

Usage::

    python bench/bench_devices.py --out bench/results/gpu_devices.json      # GPU machine
    python bench/bench_devices.py --cpu-only --tiny --out /tmp/devices.json  # anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TASKS = ("rgb18", "r50")
MODES = ("cpu", "cuda", "cuda-bf16", "ray-gpu")
RGB_NAMES = ("rgb-resnet18-0to4", "rgb-mobilenet_v3_small-5to9")


def _random_zoo(root: Path, specs: list[tuple[str, str, tuple[str, ...]]],
                input_shape: tuple[int, ...]):
    """A zoo of random-init torchvision models, imported the way a user's checkpoint is."""
    import torch
    from safetensors.torch import save_file

    from pnc_net import checkpoints
    from pnc_net.zoo import Zoo

    zoo = Zoo(root)
    for i, (name, arch, labels) in enumerate(specs):
        torch.manual_seed(i)
        model = checkpoints.build_arch(arch, {"num_classes": len(labels)})
        path = root / f"{name}.safetensors"
        root.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
        zoo.add_checkpoint(path, arch, labels, input_shape, name=name)
    return zoo


def _synthetic(n_per_class: int, classes: int, shape: tuple[int, ...]):
    """Seeded random images in [0, 1] with labels ``0..classes-1`` (train/val/test)."""
    import torch

    from pnc_net.data import Dataset

    gen = torch.Generator().manual_seed(0)

    def split(n: int):
        y = torch.arange(classes).repeat(n)
        return torch.rand(len(y), *shape, generator=gen), y

    tr, va, te = split(n_per_class), split(max(2, n_per_class // 2)), split(max(2, n_per_class // 2))
    return Dataset("synthetic", tuple(str(i) for i in range(classes)), *tr, *va, *te)


def task_setup(task: str, zoo_dir: str | None, tiny: bool, work: Path):
    """``(zoo, data, CloneConfig)`` of one task at the benchmark's budgets."""
    from dataclasses import replace

    from pnc_net.cloning import CloneConfig
    from pnc_net.data import load_rgb_digits
    from pnc_net.insert import InsertConfig
    from pnc_net.localize import LocalizeConfig
    from pnc_net.zoo import Zoo

    if task == "rgb18":
        zoo = Zoo(zoo_dir) if zoo_dir else None
        have = zoo is not None and all(any(m.name == n for m in zoo.manifests()) for n in RGB_NAMES)
        if not have:
            zoo = _random_zoo(work / "zoo-rgb", [
                (RGB_NAMES[0], "torchvision:resnet18", tuple("01234")),
                (RGB_NAMES[1], "torchvision:mobilenet_v3_small", tuple("56789"))], (3, 32, 32))
        from pnc_net.search import default_candidates

        assert zoo is not None
        blocks = [zoo.load(n)[0].num_blocks for n in RGB_NAMES]
        # the last two depth-matched candidates: the search's cost per candidate, in budget
        cfg = CloneConfig.single(RGB_NAMES[0], RGB_NAMES[1], ("5", "6"),
                                 per_class=10 if tiny else 40,
                                 target_per_class=4 if tiny else 10,
                                 positions=tuple(default_candidates(*blocks)[-2:]))
        if tiny:  # one candidate, few steps: a smoke test of the path, not a figure
            cfg = replace(cfg, synthesize=False, localize=LocalizeConfig(refine_steps=5),
                          insert=InsertConfig(epochs=1, gate_steps=20),
                          positions=cfg.positions[-1:] if cfg.positions else None)
        return zoo, load_rgb_digits(), cfg
    side = 64 if tiny else 224
    labels = [tuple(str(i) for i in range(5)), tuple(str(i) for i in range(5, 10))]
    zoo = _random_zoo(work / "zoo-r50", [("r50-0to4", "torchvision:resnet50", labels[0]),
                                         ("r50-5to9", "torchvision:resnet50", labels[1])],
                      (3, side, side))
    data = _synthetic(4 if tiny else 8, 10, (3, side, side))
    cfg = CloneConfig.single(
        "r50-0to4", "r50-5to9", ("5", "6"), per_class=4 if tiny else 8,
        target_per_class=2 if tiny else 4, synthesize=False,
        localize=LocalizeConfig(perturbations_per_sample=2, refine_steps=3 if tiny else 10,
                                batch_size=32),
        insert=InsertConfig(epochs=1 if tiny else 2, gate_steps=20 if tiny else 100,
                            augment_copies=1, batch_size=16, eval_batch_size=32,
                            veto_quantiles=(None, 0.95)))
    first = zoo.load("r50-0to4")[0].num_blocks
    return zoo, data, replace(cfg, positions=((first - 1, first - 1),))


def run_case(task: str, mode: str, zoo_dir: str | None, tiny: bool, fp_path: Path) -> dict:
    """One clone; the measurements of this process."""
    import dataclasses

    import torch

    from pnc_net.cloning import clone

    torch.set_num_threads(int(os.environ.get("PNC_BENCH_THREADS", os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory() as tmp:
        zoo, data, cfg = task_setup(task, zoo_dir, tiny, Path(tmp))
        out: dict = {"task": task, "mode": mode, "tiny": tiny,
                     "input_shape": list(data.input_shape), "threads": torch.get_num_threads()}
        if mode in ("cuda", "cuda-bf16"):
            cfg = dataclasses.replace(cfg, device="cuda",
                                      precision="bf16" if mode == "cuda-bf16" else "fp32")
        started = time.perf_counter()
        if mode == "ray-gpu":
            from pnc_net.cluster import make_ray_runner

            with make_ray_runner(num_workers=1, use_gpu=True) as runner:
                out["ray_init_s"] = time.perf_counter() - started
                result = clone(zoo, data, cfg, runner=runner, localizer=runner.localize_all)
                out["workers"] = runner.worker_info()
        else:
            result = clone(zoo, data, cfg)
        out["seconds"] = time.perf_counter() - started
        out["clone_s"] = result.report["seconds"]
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available() and mode.startswith("cuda"):
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    out["position"] = [[m.position_r, m.position_s] for m in result.package.modules]
    out.update({k: result.report["metrics"].get(k) for k in ("acc_new", "acc_old", "locality")})
    assert result.package.fingerprint is not None
    torch.save(result.package.fingerprint.probabilities, fp_path)
    return out


def _child(args: argparse.Namespace, task: str, mode: str, fp_path: Path) -> dict:
    cmd = [sys.executable, __file__, "--case", f"{task}:{mode}", "--fp", str(fp_path),
           *(["--zoo", args.zoo] if args.zoo else []), *(["--tiny"] if args.tiny else [])]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout,
                             check=False)
    except subprocess.TimeoutExpired:
        return {"task": task, "mode": mode, "error": f"timed out after {args.case_timeout}s"}
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode or not lines:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        return {"task": task, "mode": mode, "error": f"rc {res.returncode}: {tail[:300]}"}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", help="A zoo with the trained rgb set (else random init).")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--cpu-only", action="store_true", help="Only the cpu mode.")
    parser.add_argument("--tiny", action="store_true", help="Tiny budgets and r50 at 64x64.")
    parser.add_argument("--case-timeout", type=int, default=300)
    parser.add_argument("--out", default="bench/results/gpu_devices.json")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--fp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        task, mode = args.case.split(":")
        print(json.dumps(run_case(task, mode, args.zoo, args.tiny, Path(args.fp))), flush=True)
        return
    import torch

    modes = ["cpu"] if args.cpu_only else args.modes.split(",")
    if not torch.cuda.is_available():
        modes = [m for m in modes if m == "cpu"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            for mode in modes:
                fp_path = Path(tmp) / f"{task}-{mode}.pt"
                row = _child(args, task, mode, fp_path)
                cpu_fp = Path(tmp) / f"{task}-cpu.pt"
                if "error" not in row and cpu_fp.exists() and fp_path.exists():
                    a, b = torch.load(cpu_fp), torch.load(fp_path)
                    row["fp_diff_vs_cpu"] = float((a - b).abs().max()) if a.shape == b.shape \
                        else None
                rows.append(row)
                print(json.dumps(row), flush=True)
    info = {"python": sys.version.split()[0], "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cpus": os.cpu_count(), "tiny": args.tiny, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(info, indent=1) + "\n")
    for r in rows:
        what = r.get("error") or (f"{r['seconds']:.1f} s, rss {r['peak_rss_mib']:.0f} MiB"
                                  + (f", cuda {r['cuda_max_allocated_mib']:.0f} MiB"
                                     if "cuda_max_allocated_mib" in r else "")
                                  + (f", fp diff {r['fp_diff_vs_cpu']:.2g}"
                                     if r.get("fp_diff_vs_cpu") is not None else ""))
        print(f"{r['task']:6} {r['mode']:9} {what}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

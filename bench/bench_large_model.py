"""Issue 11: a resnet50 at 224x224 clones on 2 CPU cores within 8 GB of peak memory.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_large_model.py \\
        [--arch resnet50] [--size 224] [--per-class 20] [--out bench/results/large_model.json]

Random-init torchvision models (pretrained weights cannot be downloaded here), imported
through ``Zoo.add_checkpoint`` as a user would, and random 3x224x224 images in an
``.npz`` (10 classes; the target predicts 0-4, the source 5-9; 20 training images per
class, so ``--per-class 20 --target-per-class 20`` draws all of them). The clone runs
in a child process that reports its own peak resident memory (``ru_maxrss``).

What the run keeps and what it shortens: every step runs at its full batch size on
the full budget (k = 20 cloned and k_t = 20 target images per class, 4 augmented
copies each, 4 occluded copies for localization), so the peak is the full clone's;
only the *number* of steps is cut (2 refinement steps instead of 60, 1 adapter epoch
instead of 6, 20 gate steps, one candidate position, no target inversion, whose
batches are capped like localization's), because the full clone would take hours on
2 cores. The batch cap is ``pnc_net.memory``'s, which ``cloning.plan`` applies when no
``--batch-size`` is given; ``--no-cap`` runs the default batches instead (expect an
out-of-memory kill above about 20 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "results" / "large_model.json"


def prepare(root: Path, arch: str, size: int, per_class: int) -> None:
    """Two random-init checkpoints in a zoo under ``root`` and random images beside it."""
    import numpy as np
    import torch
    import torchvision

    from pnc_net.testing import frozen_randomized
    from pnc_net.zoo import Zoo

    zoo = Zoo(root / "zoo")
    for name, labels, seed in (("target", "01234", 0), ("source", "56789", 1)):
        torch.manual_seed(seed)
        model = frozen_randomized(torchvision.models.get_model(arch, num_classes=5), seed)
        path = root / f"{name}.pth"
        torch.save(model.state_dict(), path)
        zoo.add_checkpoint(path, f"torchvision:{arch}", tuple(labels), (3, size, size),
                           name=name)
    rng = np.random.default_rng(0)
    split = {"train": per_class, "val": 5, "test": 5}
    arrays = {}
    for part, n in split.items():
        arrays[f"x_{part}"] = rng.integers(0, 256, (10 * n, 3, size, size), dtype=np.uint8)
        arrays[f"y_{part}"] = np.repeat(np.arange(10), n)
    np.savez(root / "data.npz", **arrays)


def child(root: Path, per_class: int, cap: bool) -> None:
    """The clone, in this process; prints one JSON line with its figures."""
    import resource

    import torch

    from pnc_net.cloning import CloneConfig, clone
    from pnc_net.data import load_dataset
    from pnc_net.insert import InsertConfig
    from pnc_net.localize import LocalizeConfig
    from pnc_net.zoo import Zoo

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if not cap:
        os.environ["PNC_ACTIVATION_BUDGET"] = str(1 << 50)  # no cap: the steps' own batches
    zoo = Zoo(root / "zoo")
    target, _ = zoo.load("target")
    source, _ = zoo.load("source")
    position = (max(1, round(0.75 * target.num_blocks)), max(1, round(0.75 * source.num_blocks)))
    cfg = CloneConfig.single("target", "source", ("5", "6"), per_class=per_class,
                             target_per_class=per_class, positions=(position,),
                             synthesize=False, localize=LocalizeConfig(refine_steps=2),
                             insert=InsertConfig(epochs=1, gate_steps=20))
    started = time.perf_counter()
    result = clone(zoo, load_dataset(root / "data.npz"), cfg, log=lambda m: print(
        f"[{time.perf_counter() - started:6.0f} s] {m}", file=sys.stderr, flush=True))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_rss_bytes": peak, "seconds": time.perf_counter() - started,
                      "position": list(position),
                      "batch_size": result.report["settings"].get("batch_size"),
                      "package_modules": len(result.package.modules)}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--no-cap", action="store_true", help="the steps' own batches (no cap)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.per_class, not args.no_cap)
        return 0
    with tempfile.TemporaryDirectory(prefix="pnc-large-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        prepare(root, args.arch, args.size, args.per_class)
        prepared = time.perf_counter() - t0
        cmd = [sys.executable, __file__, "--child", str(root), "--per-class",
               str(args.per_class), *(["--no-cap"] if args.no_cap else [])]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        sys.stderr.write(res.stderr[-4000:])
        if res.returncode != 0:
            print(f"clone failed (exit {res.returncode})", file=sys.stderr)
            return 1
        figures = json.loads(res.stdout.strip().splitlines()[-1])
    row = {"arch": args.arch, "input": [3, args.size, args.size], "per_class": args.per_class,
           "target_per_class": args.per_class, "capped": not args.no_cap,
           "threads": int(os.environ.get("OMP_NUM_THREADS", "2")), "prepare_seconds": prepared,
           **figures, "peak_rss_gb": round(figures["peak_rss_bytes"] / 1e9, 3),
           "target_gb": 8.0, "target_ok": figures["peak_rss_bytes"] <= 8e9,
           "load_average_after": os.getloadavg(),
           "command": " ".join(["python bench/bench_large_model.py", *(argv or sys.argv[1:])])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=1) + "\n")
    print(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

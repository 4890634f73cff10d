"""More views, or a wider band, for the router's second look? (issues 10 and 14)

    OMP_NUM_THREADS=1 python bench/bench_gate_views_sweep.py DIR ['mnist*'] [VIEWS:BAND,...] \\
        >> bench/results/gate_views_sweep.jsonl

DIR holds packages cloned with ``--gate-views 8`` (``PNC_CLONE_ARGS="--gate-views 8" bash
scripts/gate_taps_runs.sh all DIR half``: MNIST runs are named ``mnist_zZOO_sSEED...`` and
read ``/tmp/pnc/zooZOO``, the others ``/tmp/pnc/rgbzoo``). Each is rebuilt and scored on
the test split with the gate's views and unsure band set to:

- ``v8b4``: as built (8 views, log-odds within ``SECOND_LOOK_LOG_ODDS`` = 4 of 0);
- ``v16b4``: 16 views, the 8 more shifted by two pixels (a ninth built view would repeat
  the first: ``training.fixed_views``);
- ``v8b6``, ``v16b6``: the same with the band widened to 6;
- or the settings given as a third argument, ``VIEWS:BAND[:SHIFT]``, e.g. ``0:4,8:4,8:6``
  (0 views: no second look) or ``8:4:1`` (SHIFT added to the gate's log-odds of the cloned
  classes, as ``--gate-log-odds`` does: a threshold moved toward the branch).

The band is the receiver's constant, not a package key, so this patches it in
``pnc_net.superbody`` for the run. Each line: test locality, acc_old, acc_new per setting.
"""

from __future__ import annotations

import glob
import json
import sys

import torch
import torch.nn.functional as F

import pnc_net.superbody as superbody_module
from pnc_net import training, wire
from pnc_net.data import load_dataset
from pnc_net.metrics import clone_metrics
from pnc_net.rebuild import build_superbody
from pnc_net.zoo import Zoo

SETTINGS = ((8, 4.0, 0.0), (16, 4.0, 0.0), (8, 6.0, 0.0), (16, 6.0, 0.0))
built_views = training.fixed_views


def ringed_views(x: torch.Tensor, transforms: tuple[str, ...] | list[str],
                 n: int) -> list[torch.Tensor]:
    """The built views, and past 8 the same ones shifted one pixel further (two in all)."""
    first = built_views(x, transforms, min(n, 8))
    views = list(first)
    for i in range(8, n):
        dx, dy = training.VIEW_SHIFTS[i % 8]
        v = F.pad(first[i % 8], (1, 1, 1, 1))
        views.append(v[..., 1 - dy : 1 - dy + x.shape[-2], 1 - dx : 1 - dx + x.shape[-1]].contiguous())
    return views


def main() -> None:
    torch.set_num_threads(1)
    superbody_module.fixed_views = ringed_views  # type: ignore[assignment]
    pattern = sys.argv[2] if len(sys.argv) > 2 else "*"
    settings = SETTINGS if len(sys.argv) < 4 else tuple(
        (int(v), float(b), float(shift[0]) if shift else 0.0)
        for v, b, *shift in (s.split(":") for s in sys.argv[3].split(",")))
    for path in sorted(glob.glob(f"{sys.argv[1]}/{pattern}.pnc")):
        name = path.split("/")[-1]
        mnist = name.startswith("mnist")
        zoo = f"/tmp/pnc/zoo{name.split('_z')[1][0]}" if mnist else "/tmp/pnc/rgbzoo"
        data = load_dataset("mnist" if mnist else "rgb-digits")
        package, _ = wire.read_package(path)
        superbody = build_superbody(Zoo(zoo), package).eval()
        gate = superbody.branches[0].gate
        bias = gate.linear.bias.detach().clone()
        row: dict = {"run": name}
        for views, band, shift in settings:
            gate.views = views
            superbody_module.SECOND_LOOK_LOG_ODDS = band
            with torch.no_grad():  # the cloned classes' scores: their logsumexp moves by shift
                gate.linear.bias.copy_(bias)
                gate.linear.bias[: gate.n_cloned] += shift
            m = clone_metrics(superbody, data)
            row[f"v{views}b{band:g}" + (f"s{shift:g}" if shift else "")] = {
                k: round(float(m[k]), 4) for k in ("locality", "acc_old", "acc_new")}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

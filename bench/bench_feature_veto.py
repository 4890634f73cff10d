"""A second veto from the target's own view of the cloned classes (measured, not built).

    OMP_NUM_THREADS=1 python bench/bench_feature_veto.py ZOO PACKAGE {mnist,rgb} [--logits] \\
        > bench/results/feature_veto_rgb.json

A Gaussian is fitted to the target's penultimate features (or, with ``--logits``, its
logits) on the cloned training digits (20 per class, plus three copies shifted by 2 px),
with the covariance shrunk towards its mean variance by ``shrink``; the gate shuts
where the Mahalanobis distance exceeds the quantile ``q`` of the distances of 20
*held-out* cloned validation digits per class (quantiles of the training digits' own
distances overfit: in 512 dimensions those are far smaller than a new digit's). Each
row scores the rebuilt superbody on the test split, with the package's energy veto
kept (``energy``) or not.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from pnc_net import wire
from pnc_net.data import load_mnist, load_rgb_digits, select_classes
from pnc_net.metrics import clone_metrics
from pnc_net.rebuild import build_superbody
from pnc_net.superbody import FusionGate
from pnc_net.zoo import Zoo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("zoo")
    ap.add_argument("package")
    ap.add_argument("data", choices=("mnist", "rgb"))
    ap.add_argument("--logits", action="store_true", help="the target's logits, not features")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_rgb_digits() if args.data == "rgb" else load_mnist()
    superbody = build_superbody(Zoo(args.zoo), wire.decode(open(args.package, "rb").read()))
    superbody.eval()
    (branch,) = superbody.branches
    target = superbody.target
    seen: dict[str, torch.Tensor] = {}
    target.head.fc.register_forward_hook(lambda _m, i, o: seen.update(f=i[0], z=o))
    key = "z" if args.logits else "f"

    def view(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target(x)
        return seen[key]

    cloned = [data.label_names.index(n) for n in branch.label_names]
    x, _ = select_classes(data.x_train, data.y_train, cloned, per_class=20, seed=0)
    shifted = [torch.roll(x, shifts=s, dims=(2, 3)) for s in ((2, 0), (0, 2), (-2, -2))]
    train = view(torch.cat([x, *shifted]))
    held_out = view(select_classes(data.x_val, data.y_val, cloned, per_class=20, seed=0)[0])
    mean, cov = train.mean(0), torch.cov((train - train.mean(0)).T)
    rows, plain = [], FusionGate.forward
    for shrink in (0.2, 0.5, 0.9):
        shrunk = (1 - shrink) * cov + shrink * torch.eye(len(mean)) * cov.diagonal().mean()
        precision = torch.linalg.inv(shrunk)

        def distance(v: torch.Tensor, precision=precision) -> torch.Tensor:
            return ((v - mean) @ precision * (v - mean)).sum(1)

        calibration = distance(held_out)
        for q in (None, 0.9, 0.95, 0.98, 0.99):
            tau = math.inf if q is None else float(torch.quantile(calibration, q))
            for energy in (True, False):
                def forward(self, z_t, z_s, f_b, tau=tau, energy=energy, distance=distance):
                    allowed = distance(seen[key]) <= tau
                    if energy:
                        allowed &= z_t.logsumexp(1) <= self.energy_max
                    return torch.sigmoid(self.logit(z_t, z_s, f_b)) * allowed.to(z_t.dtype)

                FusionGate.forward = forward  # type: ignore[method-assign]
                m = clone_metrics(superbody, data)
                rows.append({"shrink": shrink, "q": q, "energy": energy,
                             **{k: round(m[k], 3) for k in ("acc_old", "acc_new", "locality")}})
    FusionGate.forward = plain  # type: ignore[method-assign]
    print(json.dumps({"package": args.package, "view": key, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

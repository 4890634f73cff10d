"""What the router benches share: one clone's searched branch, the features a router could
read on its training and test inputs, and the test score of any gate on them.

``bench_gate_features.py``, ``bench_gate_stand_ins.py`` and ``bench_stand_in_router.py``
each keep the branch a clone searched and refit only the router, so their figures differ
from ``pnc clone``'s by the router alone.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pnc_net.cloning import CloneConfig, CloneJob, plan, router_features, searched_branch
from pnc_net.data import load_dataset
from pnc_net.insert import DiscriminantFit, Prepared
from pnc_net.superbody import Branch
from pnc_net.zoo import Zoo

CLONED = ("5", "6")
#: --source: (target, source, positions, data set), the bench's pairs
SOURCES = {"mnist": ("mnist-cnn-0to4", "mnist-cnn-5to9", ((3, 3), (4, 4)), "mnist"),
           "mobilenet": ("rgb-resnet18-0to4", "rgb-mobilenet_v3_small-5to9", ((7, 7), (6, 7)),
                         "rgb-digits"),
           "vit": ("rgb-resnet18-0to4", "rgb-vit-5to9", ((9, 6), (8, 6)), "rgb-digits")}
Features = dict[str, torch.Tensor]


def parse_args(doc: str | None, target_per_class: int | None = None) -> argparse.Namespace:
    """``--source``, ``--seed`` (the clone's), ``--zoo`` and ``--zoo-seed`` (recorded); and
    ``--target-per-class`` (k_t) for a bench that runs at either, with this default."""
    ap = argparse.ArgumentParser(description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    if target_per_class is not None:
        ap.add_argument("--target-per-class", type=int, default=target_per_class,
                        help="k_t, target-class samples per class")
    ap.add_argument("--source", choices=sorted(SOURCES), default="mnist")
    ap.add_argument("--seed", type=int, default=0, help="clone seed")
    ap.add_argument("--zoo", type=Path, required=True)
    ap.add_argument("--zoo-seed", type=int, default=0, help="recorded only")
    return ap.parse_args()


@dataclass
class RouterRun:
    """A searched branch of ``{5, 6}`` (k = 20) and what its router sees."""

    job: CloneJob
    position: tuple[int, int]
    branch: Branch
    prep: Prepared
    train: Features  # router_features of the gate's training inputs: prep.x, then x_neg
    group: torch.Tensor  # per training row: cloned index, or n_cloned + the target's class
    test_old: Features
    test_new: Features
    y_old: torch.Tensor  # target class index of each test_old input
    y_new: torch.Tensor  # cloned index of each test_new input
    x_old: torch.Tensor  # the test inputs behind test_old and test_new
    x_new: torch.Tensor

    def built_gate(self, f: Features) -> torch.Tensor:
        """The branch's own gate (as the clone trained it) on features ``f``: it reads the
        penultimate features and the taps of its boundaries (1..m, in boundary order)."""
        gate = self.branch.gate
        widths = [i.channels for i in self.job.target.feature_info(self.job.input_shape)[1:]]
        tapped = f["taps"][:, : sum(widths[: len(getattr(gate, "taps", ()))])]
        return gate(f["z_t"], f["z_s"], f["f_b"], torch.cat([f["f_t"], tapped], 1))

    def score(self, g_old: torch.Tensor, g_new: torch.Tensor) -> dict[str, float]:
        """Test locality, acc_old and acc_new of the superbody with gate values ``g``."""
        n_t, cloned = len(self.job.target_labels), self.branch.cloned_index

        def fused(f: Features, g: torch.Tensor) -> torch.Tensor:
            g = g.float()
            return torch.cat([(1 - g)[:, None] * f["z_t"].softmax(1),
                              g[:, None] * f["z_s"][:, cloned].softmax(1)], 1).argmax(1)
        p_old = fused(self.test_old, g_old)
        mean = lambda t: round(float(t.float().mean()), 4)  # noqa: E731
        return {"locality": mean(p_old == self.test_old["z_t"].argmax(1)),
                "acc_old": mean(p_old == self.y_old),
                "acc_new": mean(fused(self.test_new, g_new) == self.y_new + n_t)}

    def score_gate(self, gate: Callable[[Features], torch.Tensor]) -> dict[str, float]:
        """``score`` of a gate that reads the features."""
        return self.score(gate(self.test_old), gate(self.test_new))


def candidates(f: Features) -> torch.Tensor:
    """Every feature a discriminant could read: ``[f_t, taps, f_b]``."""
    return torch.cat([f["f_t"], f["taps"], f["f_b"]], 1)


def gate_of(x: torch.Tensor, group: torch.Tensor, n_cloned: int,
            folded: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """``insert.fit_discriminant_gate``'s gate on features ``x``: ``g(features)`` (its
    log-odds unbounded and no veto)."""
    fit = DiscriminantFit(x.double(), group, n_cloned, 0.1)
    scale, weight, bias = fit.wire_linear(carry_scale=not folded)

    def gate(f: torch.Tensor) -> torch.Tensor:
        s = (f.float() * scale) @ weight.T + bias
        return (s[:, fit.is_cloned].logsumexp(1) - s[:, ~fit.is_cloned].logsumexp(1)).sigmoid()
    return gate


def router_run(args: argparse.Namespace, target_per_class: int, gate: str = "auto") -> RouterRun:
    """Clone as ``pnc clone`` does (``--gate gate``), keep the branch, read the features."""
    target_name, source, positions, data_name = SOURCES[args.source]
    data = load_dataset(data_name)
    cfg = CloneConfig.single(target_name, source, CLONED, per_class=20,
                             target_per_class=target_per_class, seed=args.seed,
                             positions=positions)
    cfg = replace(cfg, insert=replace(cfg.insert, gate=gate))
    job = plan(Zoo(args.zoo), data, cfg)
    position, branch = searched_branch(job)
    prep = job.modules[0].prepared
    assert prep is not None
    names = data.label_names
    x, y = data.split("test")
    x = torch.as_tensor(x)
    is_old = torch.isin(y, torch.tensor([names.index(n) for n in job.target_labels]))
    is_new = torch.isin(y, torch.tensor([names.index(n) for n in CLONED]))
    train = router_features(job.target, branch, torch.cat([prep.x, prep.x_neg]))
    y_train = torch.cat([prep.y, torch.full((len(prep.x_neg),), -1)])
    n_cloned = len(branch.cloned_index)
    return RouterRun(
        job, position, branch, prep, train,
        torch.where(y_train >= 0, y_train, n_cloned + train["z_t"].argmax(1)),
        router_features(job.target, branch, x[is_old]),
        router_features(job.target, branch, x[is_new]),
        torch.tensor([job.target_labels.index(names[i]) for i in y[is_old].tolist()]),
        torch.tensor([CLONED.index(names[i]) for i in y[is_new].tolist()]),
        x[is_old], x[is_new])

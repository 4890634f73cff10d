"""Another form of router on the discriminant's features: does a discriminative fit, or a
local one, route better than the shared-covariance discriminant? (issue 14)

    OMP_NUM_THREADS=1 python bench/bench_router_forms.py --zoo /tmp/pnc/zoo0 --zoo-seed 0 \\
        --seed 0 [--source mnist|mobilenet|vit] >> bench/results/router_forms.jsonl

Clones ``{5, 6}`` (k = 20, k_t = 20, the bench's two positions) exactly as ``pnc clone``
does, keeps the branch, and refits only the router on the features the built one reads
(every tap, the half kept by parting weight), on the same training rows (the augmented
cloned digits, the real target digits, with or without the inverted stand-ins):

- ``lda``, ``lda-no_stand_ins``: the built discriminant (shrinkage 0.1);
- ``logistic-C``: class-balanced L2 logistic regression (cloned vs target) on the
  standardized features, weight decay ``1/C`` per sample, L-BFGS to convergence;
- ``knn-K``: the share of class-balanced weight among the ``K`` nearest training rows
  (standardized features, Euclidean) that is cloned.

Each row: test locality, acc_old, acc_new (the branch fixed) and ``shift{b}``, the same with
``b`` added to the gate's log-odds, so forms can be compared at the same acc_old. One JSON
line.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import torch
from router_bench import candidates, gate_of, parse_args, router_run

from pnc_net.insert import DiscriminantFit

SHIFTS = (-3, -2, -1, 1, 2, 3)
Gate = Callable[[torch.Tensor], torch.Tensor]


def logistic_gate(x: torch.Tensor, is_cloned: torch.Tensor, c: float) -> Gate:
    """Class-balanced L2 logistic regression on standardized ``x``."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = ((x - mean) / std).double()
    y = is_cloned.double()
    w_row = torch.where(is_cloned, 0.5 / is_cloned.sum(), 0.5 / (~is_cloned).sum()).double()
    w = torch.zeros(z.shape[1], dtype=torch.double, requires_grad=True)
    b = torch.zeros((), dtype=torch.double, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (w_row * torch.nn.functional.binary_cross_entropy_with_logits(
            z @ w + b, y, reduction="none")).sum() + 0.5 / (c * len(z)) * w.square().sum()
        loss.backward()
        return loss
    opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda f: ((((f - mean) / std).double() @ w) + b).sigmoid()


def knn_gate(x: torch.Tensor, is_cloned: torch.Tensor, k: int) -> Gate:
    """Class-balanced share of cloned rows among the ``k`` nearest."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w_row = torch.where(is_cloned, 0.5 / is_cloned.sum(), 0.5 / (~is_cloned).sum())

    def gate(f: torch.Tensor) -> torch.Tensor:
        near = torch.cdist((f - mean) / std, z).topk(k, largest=False).indices
        w = w_row[near]
        return ((w * is_cloned[near]).sum(1) / w.sum(1)).double().clamp(0.01, 0.99)
    return gate


def main() -> None:
    args = parse_args(__doc__)
    started = time.time()
    setup = router_run(args, target_per_class=20)
    prep, train, group = setup.prep, setup.train, setup.group
    assert prep.stand_in is not None
    n_cloned = len(setup.branch.cloned_index)
    real = torch.cat([~prep.stand_in, torch.ones(len(prep.x_neg), dtype=torch.bool)])
    every_row = torch.ones_like(real)
    x_all, old, new = candidates(train), candidates(setup.test_old), candidates(setup.test_new)

    def with_shifts(gate: Gate) -> dict:
        g_old, g_new = gate(old), gate(new)
        log_odds = lambda g: g.double().clamp(1e-12, 1 - 1e-12).logit()  # noqa: E731
        return {**setup.score(g_old, g_new),
                **{f"shift{b}": setup.score((log_odds(g_old) + b).sigmoid(),
                                            (log_odds(g_new) + b).sigmoid()) for b in SHIFTS}}

    def half(rows: torch.Tensor) -> torch.Tensor:
        fit = DiscriminantFit(x_all[rows].double(), group[rows], n_cloned, 0.1)
        return fit.parting_weight().argsort(descending=True)[: x_all.shape[1] // 2].sort().values

    out = {}
    for label, rows in (("", every_row), ("-no_stand_ins", real)):
        cols = half(rows)
        x, g = x_all[rows][:, cols], group[rows]
        lda = gate_of(x, g, n_cloned, False)
        out[f"lda{label}"] = with_shifts(lambda f, lda=lda, cols=cols: lda(f[:, cols]))
        is_cloned = g < n_cloned
        for c in (0.01, 0.1, 1.0):
            lr = logistic_gate(x, is_cloned, c)
            out[f"logistic-{c}{label}"] = with_shifts(lambda f, lr=lr, cols=cols: lr(f[:, cols]))
        for k in (5, 15):
            nn = knn_gate(x, is_cloned, k)
            out[f"knn-{k}{label}"] = with_shifts(lambda f, nn=nn, cols=cols: nn(f[:, cols]))
    print(json.dumps({"source": setup.job.modules[0].manifest.name, "zoo_seed": args.zoo_seed,
                      "seed": args.seed, "position": list(setup.position),
                      "seconds": round(time.time() - started), "rows": out}))


if __name__ == "__main__":
    main()

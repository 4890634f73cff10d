"""Where the rgb router's errors come from: the features, or the 20 samples? (issue 10/14)

    OMP_NUM_THREADS=1 python bench/bench_rgb_router.py [--source mobilenet|vit|mnist] \\
        [--seed N] [--zoo /tmp/pnc/rgbzoo] >> bench/results/rgb_router.jsonl

Clones ``{5, 6}`` into ``rgb-resnet18-0to4`` (k = 20, k_t = 20, the bench's first
position for the pair) exactly as ``pnc clone`` does, then keeps the branch and
refits only the discriminant gate (``insert.fit_discriminant_gate``'s estimator) on:

- ``built``: the package's gate, as trained;
- ``train``: the gate's own training set, refitted here (should match ``built``);
- ``more_K``: the same plus ``K`` more real digits per class (cloned and target) from
  the training split, unaugmented: does a larger budget close the gap?
- ``test_fit``: fitted on the test split itself: the ceiling of a linear router on
  these features (optimistic: fit and scored on the same digits);
- ``+taps``: the target's pooled features at every boundary joined to ``f_t, f_b``
  (does an earlier layer separate cloned digits from the target's own?), and subsets
  (``taps_upto_R``, ``taps_last3``, ``taps_first_half``);
- ``_int8``: the same weights rounded as a package stores them, folded standardization
  (what showed that a gate with taps must keep its scales apart, ``docs/method.md``).

``--source mnist`` runs the default MNIST task instead (its position searched).

Each row gives test locality and acc_new (the branch fixed) and routing errors.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pnc_net.cloning import CloneConfig, plan, router_features, searched_branch
from pnc_net.data import load_dataset
from pnc_net.insert import on_int8_grid
from pnc_net.zoo import Zoo

CLONED = ("5", "6")
#: --source: (target, source, position, data set); "mnist" is the default MNIST task
SOURCES = {"mobilenet": ("rgb-resnet18-0to4", "rgb-mobilenet_v3_small-5to9", (7, 7), "rgb-digits"),
           "vit": ("rgb-resnet18-0to4", "rgb-vit-5to9", (9, 6), "rgb-digits"),
           "mnist": ("mnist-cnn-0to4", "mnist-cnn-5to9", None, "mnist")}
Features = dict[str, torch.Tensor]


def lda(x: torch.Tensor, group: torch.Tensor, n_cloned: int, shrink: float = 0.1,
        int8: bool = False):
    """``insert.fit_discriminant_gate``'s estimator on features ``x`` with groups
    (cloned index, or ``n_cloned + `` the target's predicted class): ``g(x)``."""
    x = x.double()
    classes = group.unique()
    mu, sd = x.mean(0), x.std(0) + 1e-3
    z = (x - mu) / sd
    means = torch.stack([z[group == c].mean(0) for c in classes])
    resid = z - means[torch.searchsorted(classes, group)]
    cov = resid.T @ resid / len(z)
    cov = (1 - shrink) * cov + shrink * torch.eye(len(cov), dtype=cov.dtype) * cov.diagonal().mean()
    coef = torch.linalg.solve(cov, means.T).T
    is_cloned = classes < n_cloned
    prior = torch.where(is_cloned, 0.5 / n_cloned, 0.5 / int((~is_cloned).sum())).log()
    bias = -0.5 * (coef * means).sum(1) + prior
    weight = coef / sd  # folded as the built gate folds it
    bias = bias - weight @ mu
    bias = bias - bias.mean()  # softmax-invariant; small for fp16, as the built gate keeps it
    if int8:  # as the package stores it (insert.fit_discriminant_gate)
        weight = on_int8_grid(weight.float()).double()
        bias = bias.float().half().double()

    def gate(f: torch.Tensor) -> torch.Tensor:
        s = f.double() @ weight.T + bias
        return (s[:, is_cloned].logsumexp(1) - s[:, ~is_cloned].logsumexp(1)).sigmoid().float()

    return gate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", choices=sorted(SOURCES), default="mobilenet")
    ap.add_argument("--seed", type=int, default=1, help="clone seed")
    ap.add_argument("--zoo", type=Path, default=Path("/tmp/pnc/rgbzoo"))
    ap.add_argument("--more", default="20,80", help="extra real digits per class, comma list")
    args = ap.parse_args()
    torch.set_num_threads(1)
    target_name, source, position, data_name = SOURCES[args.source]
    data = load_dataset(data_name)
    zoo = Zoo(args.zoo)
    cfg = CloneConfig.single(target_name, source, CLONED, per_class=20, target_per_class=20,
                             seed=args.seed, positions=(position,) if position else None)
    started = time.time()
    job = plan(zoo, data, cfg)
    module = job.modules[0]
    position, branch = searched_branch(job)
    target, prep = job.target, module.prepared
    clone_seconds = time.time() - started
    n_t, cloned = len(job.target_labels), branch.cloned_index

    def features(x: torch.Tensor) -> Features:
        return router_features(target, branch, x)

    names = data.label_names
    old_ids = torch.tensor([names.index(n) for n in job.target_labels])
    new_ids = torch.tensor([names.index(n) for n in CLONED])

    def split(which: str) -> tuple[Features, Features, torch.Tensor]:
        x, y = data.split(which)
        x = torch.as_tensor(x)
        is_old, is_new = torch.isin(y, old_ids), torch.isin(y, new_ids)
        y_new = torch.tensor([CLONED.index(names[i]) for i in y[is_new].tolist()])
        return features(x[is_old]), features(x[is_new]), y_new

    test_old, test_new, y_test_new = split("test")
    train = features(torch.cat([prep.x, prep.x_neg]))
    y_train = torch.cat([prep.y, torch.full((len(prep.x_neg),), -1)])

    def groups(f: Features, y: torch.Tensor) -> torch.Tensor:
        return torch.where(y >= 0, y, len(cloned) + f["z_t"].argmax(1))

    def score(g_old: torch.Tensor, g_new: torch.Tensor) -> dict[str, float]:
        def fused(f: Features, g: torch.Tensor) -> torch.Tensor:
            return torch.cat([(1 - g)[:, None] * f["z_t"].softmax(1),
                              g[:, None] * f["z_s"][:, cloned].softmax(1)], 1).argmax(1)
        return {"locality": round(float((fused(test_old, g_old) == test_old["z_t"].argmax(1))
                                        .float().mean()), 4),
                "acc_new": round(float((fused(test_new, g_new) == y_test_new + n_t)
                                       .float().mean()), 4),
                "routing_error_old": round(float((g_old > 0.5).float().mean()), 4),
                "routing_error_new": round(float((g_new <= 0.5).float().mean()), 4)}

    def cat(fs: list[Features]) -> Features:
        return {k: torch.cat([f[k] for f in fs]) for k in fs[0]}

    def fit_and_score(fit: Features, y: torch.Tensor, keys: tuple[str, ...],
                      int8: bool = False) -> dict[str, float]:
        gate = lda(torch.cat([fit[k] for k in keys], 1), groups(fit, y), len(cloned), int8=int8)
        return score(gate(torch.cat([test_old[k] for k in keys], 1)),
                     gate(torch.cat([test_new[k] for k in keys], 1)))

    g = branch.gate
    rows = {"built": score(g(test_old["z_t"], test_old["z_s"], test_old["f_b"], test_old["f_t"]),
                           g(test_new["z_t"], test_new["z_s"], test_new["f_b"], test_new["f_t"]))}
    base, taps = ("f_t", "f_b"), ("f_t", "f_b", "taps")
    rows["train"] = fit_and_score(train, y_train, base)
    rows["train+taps"] = fit_and_score(train, y_train, taps)
    rows["train_int8"] = fit_and_score(train, y_train, base, int8=True)
    rows["train+taps_int8"] = fit_and_score(train, y_train, taps, int8=True)
    widths = [w.channels for w in target.feature_info(job.input_shape)[1:]]
    ends = torch.tensor(widths).cumsum(0).tolist()
    for name, picked in (("taps_upto_R", range(branch.position_r)),
                         ("taps_last3", range(len(widths) - 3, len(widths))),
                         ("taps_first_half", range(len(widths) // 2))):
        cols = torch.cat([torch.arange(e - w, e) for i, (w, e) in enumerate(zip(widths, ends))
                          if i in picked])
        sub = {**train, "sub": train["taps"][:, cols]}
        test_old["sub"], test_new["sub"] = test_old["taps"][:, cols], test_new["taps"][:, cols]
        rows[f"train+{name}"] = {**fit_and_score(sub, y_train, ("f_t", "f_b", "sub")),
                                  "tap_dims": len(cols)}
        rows[f"train+{name}_int8"] = fit_and_score(sub, y_train, ("f_t", "f_b", "sub"), int8=True)
    rows["tap_widths"] = widths  # type: ignore[assignment]
    x_tr, y_tr = data.split("train")
    x_tr = torch.as_tensor(x_tr)
    gen = torch.Generator().manual_seed(1000 + args.seed)
    for extra in (int(k) for k in args.more.split(",")):
        xs, ys = [], []
        for lab in [*CLONED, *job.target_labels]:
            idx = torch.nonzero(y_tr == names.index(lab)).flatten()
            idx = idx[torch.randperm(len(idx), generator=gen)[:extra]]
            xs.append(x_tr[idx])
            ys.append(torch.full((len(idx),), CLONED.index(lab) if lab in CLONED else -1))
        more = cat([train, features(torch.cat(xs))])
        y_more = torch.cat([y_train, *ys])
        rows[f"more_{extra}"] = fit_and_score(more, y_more, base)
        rows[f"more_{extra}+taps"] = fit_and_score(more, y_more, taps)
    test_all = cat([test_old, test_new])
    y_all = torch.cat([torch.full((len(test_old["z_t"]),), -1), y_test_new])
    rows["test_fit"] = fit_and_score(test_all, y_all, base)
    rows["test_fit+taps"] = fit_and_score(test_all, y_all, taps)
    print(json.dumps({"source": source, "seed": args.seed, "position": list(position),
                      "clone_seconds": round(clone_seconds), "rows": rows}))


if __name__ == "__main__":
    main()

"""Which features should the discriminant gate keep? Fewer bytes for taps (issue 14).

    OMP_NUM_THREADS=1 python bench/bench_gate_features.py --zoo /tmp/pnc/zoo0 --zoo-seed 0 \\
        --seed 0 [--source mnist|mobilenet|vit] >> bench/results/gate_features_router.jsonl

Clones ``{5, 6}`` (k = 20, k_t = 20, the bench's two positions for the pair) exactly as
``pnc clone`` does, keeps the branch, and refits only the discriminant
(``insert.DiscriminantFit``, weights on the int8 grid as a package stores them) on subsets
of its candidate features ``[f_t, taps, f_b]`` (penultimate target features, the target's
features pooled at every boundary, the branch's features):

- ``built``: the package's gate as trained, with the defaults of when this runs
  (``--gate-taps all --gate-features half`` now: compare with ``top_parting@0.5``);
- ``none``, ``early``, ``all``: no taps (standardization folded into the weight), the
  first half of the boundaries, every boundary (scales carried), all features kept;
- ``base+{how}{m}``: no-tap features plus the ``m`` taps ranked first by ``how``;
- ``top_{how}@{f}``: the ``f`` x (untapped width) features ranked first by ``how`` among
  all candidates (``top_parting@0.5`` is ``--gate-features half``, the default);
- ``...+stats``: with the six confidence statistics of the MLP gate's inputs (both heads'
  max-probability, entropy and logsumexp), which are not linear in the features.

Rankings on the standardized training features: ``parting`` (``DiscriminantFit.
parting_weight``: |cov^-1 (mean cloned - mean target)|), ``fisher`` (the same gap squared
over the within-class variance, feature by feature) and ``between`` (the variance of the
group means over the within-class variance). Each row: test locality, acc_old, acc_new
(the branch fixed) and ``d``, the features kept. One JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pnc_net.cloning import CloneConfig, plan, router_features, searched_branch
from pnc_net.data import load_dataset
from pnc_net.insert import DiscriminantFit
from pnc_net.superbody import gate_features
from pnc_net.zoo import Zoo

CLONED = ("5", "6")
#: --source: (target, source, positions, data set), the bench's pairs
SOURCES = {"mnist": ("mnist-cnn-0to4", "mnist-cnn-5to9", ((3, 3), (4, 4)), "mnist"),
           "mobilenet": ("rgb-resnet18-0to4", "rgb-mobilenet_v3_small-5to9", ((7, 7), (6, 7)),
                         "rgb-digits"),
           "vit": ("rgb-resnet18-0to4", "rgb-vit-5to9", ((9, 6), (8, 6)), "rgb-digits")}
Features = dict[str, torch.Tensor]
FRACTIONS = ("0.3", "0.5", "0.75", "1.0")


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


def ranking(x: torch.Tensor, group: torch.Tensor, n_cloned: int, how: str) -> torch.Tensor:
    """Feature scores, higher first kept."""
    fit = DiscriminantFit(x.double(), group, n_cloned, 0.1)
    if how == "parting":
        return fit.parting_weight()
    within = fit.cov.diagonal()
    if how == "fisher":
        gap = fit.means[fit.is_cloned].mean(0) - fit.means[~fit.is_cloned].mean(0)
        return gap ** 2 / within
    return fit.means.var(0) / within  # between


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", choices=sorted(SOURCES), default="mnist")
    ap.add_argument("--seed", type=int, default=0, help="clone seed")
    ap.add_argument("--zoo", type=Path, required=True)
    ap.add_argument("--zoo-seed", type=int, default=0, help="recorded only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    target_name, source, positions, data_name = SOURCES[args.source]
    data = load_dataset(data_name)
    cfg = CloneConfig.single(target_name, source, CLONED, per_class=20, target_per_class=20,
                             seed=args.seed, positions=positions)
    started = time.time()
    job = plan(Zoo(args.zoo), data, cfg)
    position, branch = searched_branch(job)
    target, prep = job.target, job.modules[0].prepared
    n_t, cloned = len(job.target_labels), branch.cloned_index

    def features(x: torch.Tensor) -> Features:
        return router_features(target, branch, x)

    names = data.label_names
    x, y = data.split("test")
    x = torch.as_tensor(x)
    is_old = torch.isin(y, torch.tensor([names.index(n) for n in job.target_labels]))
    is_new = torch.isin(y, torch.tensor([names.index(n) for n in CLONED]))
    y_new = torch.tensor([CLONED.index(names[i]) for i in y[is_new].tolist()])
    y_old = torch.tensor([job.target_labels.index(names[i]) for i in y[is_old].tolist()])
    test_old, test_new = features(x[is_old]), features(x[is_new])
    train = features(torch.cat([prep.x, prep.x_neg]))
    y_train = torch.cat([prep.y, torch.full((len(prep.x_neg),), -1)])
    group = torch.where(y_train >= 0, y_train, len(cloned) + train["z_t"].argmax(1))

    def score(g_old: torch.Tensor, g_new: torch.Tensor) -> dict[str, float]:
        def fused(f: Features, g: torch.Tensor) -> torch.Tensor:
            g = g.float()
            return torch.cat([(1 - g)[:, None] * f["z_t"].softmax(1),
                              g[:, None] * f["z_s"][:, cloned].softmax(1)], 1).argmax(1)
        p_old = fused(test_old, g_old)
        mean = lambda t: round(float(t.float().mean()), 4)  # noqa: E731
        return {"locality": mean(p_old == test_old["z_t"].argmax(1)),
                "acc_old": mean(p_old == y_old),
                "acc_new": mean(fused(test_new, g_new) == y_new + n_t)}

    def candidates(f: Features) -> torch.Tensor:
        return torch.cat([f["f_t"], f["taps"], f["f_b"]], 1)

    def run(cols: torch.Tensor, folded: bool = False) -> dict[str, float]:
        cols = cols.sort().values
        gate = gate_of(candidates(train)[:, cols], group, len(cloned), folded)
        return {**score(gate(candidates(test_old)[:, cols]), gate(candidates(test_new)[:, cols])),
                "d": len(cols)}

    d_t, d_taps, d_b = (train[k].shape[1] for k in ("f_t", "taps", "f_b"))
    everything = torch.arange(d_t + d_taps + d_b)
    base = torch.cat([everything[:d_t], everything[d_t + d_taps:]])
    tap_cols = everything[d_t : d_t + d_taps]
    widths = [i.channels for i in target.feature_info(job.input_shape)[1:]]
    g = branch.gate
    tapped = tap_cols[: sum(widths[: len(getattr(g, "taps", ()))])]  # taps are 1..m

    def built(f: Features) -> torch.Tensor:  # the gate reads [f_t, its taps]
        f_t = torch.cat([f["f_t"], f["taps"][:, tapped - d_t]], 1)
        return g(f["z_t"], f["z_s"], f["f_b"], f_t)

    rows = {"built": score(built(test_old), built(test_new)),
            "none": run(base, folded=True), "all": run(everything),
            "early": run(torch.cat([base, tap_cols[: sum(widths[: len(widths) // 2])]]))}

    def stats(f: Features) -> torch.Tensor:  # gate_features' six confidence statistics
        return gate_features(f["z_t"], f["z_s"], f["f_b"])[:, n_t + f["z_s"].shape[1]:][:, :6]

    def run_stats(cols: torch.Tensor) -> dict[str, float]:
        """``cols`` of the candidates plus the statistics (their scales carried)."""
        cols = cols.sort().values
        pick = lambda f: torch.cat([candidates(f)[:, cols], stats(f)], 1)  # noqa: E731
        gate = gate_of(pick(train), group, len(cloned), folded=False)
        return {**score(gate(pick(test_old)), gate(pick(test_new))), "d": len(cols) + 6}

    scores = {how: ranking(candidates(train), group, len(cloned), how)
              for how in ("parting", "fisher", "between")}
    rows["all+stats"] = run_stats(everything)
    rows["top_parting@0.5+stats"] = run_stats(
        scores["parting"].argsort(descending=True)[: len(base) // 2])
    for how, score_of in scores.items():
        order = score_of.argsort(descending=True)
        tap_order = tap_cols[score_of[tap_cols].argsort(descending=True)]
        for m in (8, 16, 32, 64):
            rows[f"base+{how}{m}"] = run(torch.cat([base, tap_order[:m]]))
        for frac in FRACTIONS:
            rows[f"top_{how}@{frac}"] = run(order[: int(len(base) * float(frac))])
    print(json.dumps({"source": source, "zoo_seed": args.zoo_seed, "seed": args.seed,
                      "position": list(position), "dims": [d_t, d_taps, d_b],
                      "seconds": round(time.time() - started), "rows": rows}))


if __name__ == "__main__":
    main()

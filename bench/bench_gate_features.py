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

import json
import time

import torch
from router_bench import Features, candidates, gate_of, parse_args, router_run

from pnc_net.insert import DiscriminantFit
from pnc_net.superbody import gate_features

FRACTIONS = ("0.3", "0.5", "0.75", "1.0")


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
    args = parse_args(__doc__)
    started = time.time()
    setup = router_run(args, target_per_class=20)
    job, branch, train, group = setup.job, setup.branch, setup.train, setup.group
    target, cloned, n_t = job.target, branch.cloned_index, len(job.target_labels)
    test_old, test_new, score = setup.test_old, setup.test_new, setup.score

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

    rows = {"built": setup.score_gate(setup.built_gate),
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
    print(json.dumps({"source": job.modules[0].manifest.name, "zoo_seed": args.zoo_seed,
                      "seed": args.seed, "position": list(setup.position), "dims": [d_t, d_taps, d_b],
                      "seconds": round(time.time() - started), "rows": rows}))


if __name__ == "__main__":
    main()

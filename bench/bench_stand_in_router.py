"""Which router without target samples (k_t = 0)? The discriminant against stand-ins (issue 14).

    OMP_NUM_THREADS=1 python bench/bench_stand_in_router.py --zoo /tmp/pnc/zoo0 --zoo-seed 0 \\
        --seed 0 [--source mnist|mobilenet|vit] >> bench/results/stand_in_router.jsonl

Clones ``{5, 6}`` at k = 20 with no target-class sample (k_t = 0, the bench's two
positions for the pair) as ``pnc clone --gate mlp`` does, so the target side of the
gate's training set is the target's BatchNorm-inverted stand-ins
(``pnc_net/synthesize.py``) and the occluded negatives. The branch is kept and only the
router is refitted on it, on the int8 grid as a package stores it:

- ``mlp*veto``: the MLP gate with the target's energy veto at q = 0.95, as trained
  (``pnc clone``'s k_t = 0 router before stop 28);
- ``lda``: the discriminant (``insert.DiscriminantFit``) on the untapped features
  ``[f_t, f_b]``, no veto; ``lda*veto{q}``: under the veto at quantile q of the target's
  logsumexp on the cloned training digits (0.95 is ``pnc clone``'s fixed k_t = 0 value);
- ``lda_half*veto0.95``: half of those features kept by parting weight (``--gate-taps
  auto --gate-features half`` at k_t = 0: what ``pnc clone`` builds now);
- ``taps*veto0.95``, ``taps_half*veto0.95``: with the target's features pooled at every
  boundary (the k_t = 20 default, ``--gate-taps all``), all or half kept;
- ``lda_no_occluded*veto0.95``: fitted without the occluded negatives;
- ``lda*mlp``: both gates multiplied (the MLP's veto included).

Each row: test locality, acc_old, acc_new (the branch fixed). One JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from bench_gate_features import CLONED, SOURCES, gate_of

from pnc_net.cloning import CloneConfig, plan, router_features, searched_branch
from pnc_net.data import load_dataset
from pnc_net.insert import DiscriminantFit
from pnc_net.superbody import energy_allowed
from pnc_net.zoo import Zoo

Features = dict[str, torch.Tensor]
QUANTILES = (0.9, 0.95, 0.98, 0.99)


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
    cfg = CloneConfig.single(target_name, source, CLONED, per_class=20, target_per_class=0,
                             seed=args.seed, positions=positions)
    cfg = replace(cfg, insert=replace(cfg.insert, gate="mlp"))
    started = time.time()
    job = plan(Zoo(args.zoo), data, cfg)
    position, branch = searched_branch(job)
    target, prep = job.target, job.modules[0].prepared
    n_t, cloned = len(job.target_labels), branch.cloned_index

    names = data.label_names
    x, y = data.split("test")
    x = torch.as_tensor(x)
    is_old = torch.isin(y, torch.tensor([names.index(n) for n in job.target_labels]))
    is_new = torch.isin(y, torch.tensor([names.index(n) for n in CLONED]))
    y_new = torch.tensor([CLONED.index(names[i]) for i in y[is_new].tolist()])
    y_old = torch.tensor([job.target_labels.index(names[i]) for i in y[is_old].tolist()])
    test_old, test_new = (router_features(target, branch, x[m]) for m in (is_old, is_new))
    train = router_features(target, branch, torch.cat([prep.x, prep.x_neg]))
    y_train = torch.cat([prep.y, torch.full((len(prep.x_neg),), -1)])
    occluded = torch.arange(len(y_train)) >= len(prep.x)
    group = torch.where(y_train >= 0, y_train, len(cloned) + train["z_t"].argmax(1))
    lse_cloned = train["z_t"][: len(prep.x)][prep.y >= 0].logsumexp(1)

    def score(gate) -> dict[str, float]:
        def fused(f: Features) -> torch.Tensor:
            g = gate(f).float()
            return torch.cat([(1 - g)[:, None] * f["z_t"].softmax(1),
                              g[:, None] * f["z_s"][:, cloned].softmax(1)], 1).argmax(1)
        p_old = fused(test_old)
        mean = lambda t: round(float(t.float().mean()), 4)  # noqa: E731
        return {"locality": mean(p_old == test_old["z_t"].argmax(1)),
                "acc_old": mean(p_old == y_old), "acc_new": mean(fused(test_new) == y_new + n_t)}

    def veto(q: float):
        tau = float(torch.quantile(lse_cloned, q).half())  # as calibrate_energy_veto sets it
        return lambda f: energy_allowed(f["z_t"], torch.tensor([tau]))

    untapped = lambda f: torch.cat([f["f_t"], f["f_b"]], 1)  # noqa: E731
    tapped = lambda f: torch.cat([f["f_t"], f["taps"], f["f_b"]], 1)  # noqa: E731

    def lda(read, rows: torch.Tensor | None = None, half: bool = False):
        """The discriminant on ``read(features)`` (the training rows ``rows``), its
        standardization folded unless it keeps half of them (``fit_discriminant_gate``)."""
        rows = torch.ones(len(group), dtype=torch.bool) if rows is None else rows
        x_fit = read(train)[rows]
        cols = torch.arange(x_fit.shape[1])
        if half:
            parting = DiscriminantFit(x_fit.double(), group[rows], len(cloned), 0.1).parting_weight()
            cols = parting.argsort(descending=True)[: untapped(train).shape[1] // 2].sort().values
        g = gate_of(x_fit[:, cols], group[rows], len(cloned), folded=not half and read is untapped)
        return lambda f: g(read(f)[:, cols])

    mlp = lambda f: branch.gate(f["z_t"], f["z_s"], f["f_b"], f["f_t"])  # noqa: E731
    times = lambda a, b: (lambda f: a(f) * b(f))  # noqa: E731
    plain, at95 = lda(untapped), veto(0.95)
    rows = {"mlp*veto": score(mlp), "lda": score(plain)}
    rows |= {f"lda*veto{q}": score(times(plain, veto(q))) for q in QUANTILES}
    rows["lda_half*veto0.95"] = score(times(lda(untapped, half=True), at95))
    rows["taps*veto0.95"] = score(times(lda(tapped), at95))
    rows["taps_half*veto0.95"] = score(times(lda(tapped, half=True), at95))
    rows["lda_no_occluded*veto0.95"] = score(times(lda(untapped, ~occluded), at95))
    rows["lda*mlp"] = score(times(plain, mlp))
    print(json.dumps({"source": source, "zoo_seed": args.zoo_seed, "seed": args.seed,
                      "position": list(position), "seconds": round(time.time() - started),
                      "rows": rows}))


if __name__ == "__main__":
    main()

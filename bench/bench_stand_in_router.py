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

import json
import time

import torch
from router_bench import gate_of, parse_args, router_run

from pnc_net.insert import DiscriminantFit
from pnc_net.superbody import energy_allowed

QUANTILES = (0.9, 0.95, 0.98, 0.99)


def main() -> None:
    args = parse_args(__doc__)
    started = time.time()
    setup = router_run(args, target_per_class=0, gate="mlp")
    branch, prep, train, group = setup.branch, setup.prep, setup.train, setup.group
    cloned = branch.cloned_index
    occluded = torch.arange(len(group)) >= len(prep.x)
    lse_cloned = train["z_t"][: len(prep.x)][prep.y >= 0].logsumexp(1)
    score = setup.score_gate

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
    print(json.dumps({"source": setup.job.modules[0].manifest.name, "zoo_seed": args.zoo_seed,
                      "seed": args.seed, "position": list(setup.position), "seconds": round(time.time() - started),
                      "rows": rows}))


if __name__ == "__main__":
    main()

"""A package made lossy on purpose, for the repair tests (``from lossy import damaged``)."""

from __future__ import annotations

import copy

import torch

from pnc_net.package import Package
from pnc_net.rebuild import build_superbody, fingerprint_error, load_ref
from pnc_net.zoo import Zoo


def damaged(pkg: Package, zoo: Zoo, margin: float = 2.0, seed: int = 0) -> Package:
    """``pkg`` with seeded noise on its adapter (as a crude quantizer would add), fingerprint
    kept, and strong enough that the rebuilt superbody misses the fingerprint by ``margin``
    times its tolerance. How much noise that takes depends on the clone, so it is searched
    (noise of 0.5, 1, 2, ... times the mean absolute adapter weight) instead of fixed."""
    _, _, shape = load_ref(zoo, pkg.target)
    noise = 0.5
    while noise <= 64:
        bad = copy.deepcopy(pkg)
        gen = torch.Generator().manual_seed(seed)
        for k, v in bad.modules[0].tensors.items():
            if k.startswith("adapter."):
                bad.modules[0].tensors[k] = v + noise * v.abs().mean() * torch.randn(
                    v.shape, generator=gen)
        if fingerprint_error(build_superbody(zoo, bad), bad.fingerprint, shape) > (
                margin * pkg.fingerprint.tolerance):
            return bad
        noise *= 2
    raise AssertionError("adapter noise up to 64x its mean weight left the fingerprint intact")

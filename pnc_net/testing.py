"""Helpers for checking a wrapped network, shared by the tests and ``bench/``
(as ``torch.testing`` is): models whose every wrong slice shows, and random masks.

At random init a BatchNorm is the identity (mean 0, variance 1, weight 1, bias 0),
so slicing one wrongly changes nothing and a pruning bug hides; these helpers give
every BatchNorm statistics and affine terms that differ per channel.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from pnc_net import wire
from pnc_net.models import ZooNet, build_model
from pnc_net.package import ClonedModule, Package, ZooRef
from pnc_net.rebuild import branch_tensors, fingerprint_of
from pnc_net.superbody import Superbody, build_branch
from pnc_net.zoo import Zoo


def randomize_batchnorm(model: nn.Module, seed: int) -> nn.Module:
    """Every ``BatchNorm2d`` of ``model`` given seeded statistics and affine terms that
    are not the identity (in place; returns ``model``)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean = torch.randn(n, generator=gen) * 0.1
            m.running_var = torch.rand(n, generator=gen) + 0.5
            m.weight.data = torch.rand(n, generator=gen) + 0.5
            m.bias.data = torch.randn(n, generator=gen) * 0.1
    return model


def frozen_randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """``randomize_batchnorm``, then eval mode without gradients (as the zoo hands models out)."""
    randomize_batchnorm(model, seed)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def random_masks(widths: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
    """About half of every unit's channels kept: never none (the first is kept) and
    never all (the last is dropped), so a mask always removes something."""
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name, width in widths.items():
        m = torch.rand(width, generator=gen) < 0.5
        m[0], m[-1] = True, False
        masks[name] = m
    return masks


@dataclass
class PruneCheck:
    """A net's tail from one boundary, gated by masks and physically pruned."""

    masked: torch.Tensor  # logits of the net's own tail with the masks as gates
    pruned: torch.Tensor  # logits of the pruned copy's tail on the channels it keeps
    keep: torch.Tensor | None  # those channels at the boundary (None: all of them)
    pruned_params: int
    full_params: int


def masked_and_pruned(net: ZooNet, masks: dict[str, torch.Tensor], x: torch.Tensor,
                      start: int) -> PruneCheck:
    """``net``'s tail from boundary ``start``, masked and pruned (``pruned_tail``).

    The two logits must agree to float rounding, and the parameter counts show that
    pruning removed something. Raises what ``pruned_tail`` raises (a boundary it
    refuses, e.g. a concatenation of several units).
    """
    with torch.no_grad():
        h = net.forward_features(x, start)
        net.set_gates({k: m.float() for k, m in masks.items()})
        try:
            masked = net.forward_from(h, start)
        finally:
            net.set_gates(None)
        blocks, head, keep = net.pruned_tail(start, masks)
        u = h if keep is None else h[:, keep]
        for block in blocks:
            u = block(u)
        pruned = head(u)
    smaller = sum(p.numel() for p in [*blocks.parameters(), *head.parameters()])
    full = sum(p.numel() for m in [*list(net.blocks)[start:], net.head] for p in m.parameters())
    return PruneCheck(masked, pruned, keep, smaller, full)


def two_cnn_package(zoo: Zoo, shape: tuple[int, ...], names: tuple[str, str],
                    seed: int = 0) -> bytes:
    """An encoded package over two random-init pnc CNNs taking ``shape``, added to ``zoo``
    as ``names`` (target with labels a-c, source with d-f; d and e cloned at 3:3): a
    real branch and a real fingerprint, so a receiver verifies and serves it."""
    torch.manual_seed(seed)
    manifests, nets = [], []
    for name, labels in zip(names, (("a", "b", "c"), ("d", "e", "f"))):
        net = build_model("cnn", in_channels=shape[0], num_classes=3).eval()
        manifests.append(zoo.add(net, {"name": name, "arch": "cnn",
                                       "arch_args": {"in_channels": shape[0], "num_classes": 3},
                                       "input_shape": shape, "label_names": labels,
                                       "dataset": "synthetic"}))
        nets.append(net)
    (mt, ms), (target, source) = manifests, nets
    masks = {k: torch.ones(w, dtype=torch.bool) for k, w in source.mask_widths().items()}
    branch, _ = build_branch(target, source, shape, 3, 3, masks, (0, 1), ("d", "e"), 8, 8, 3)
    sb = Superbody(target, mt.label_names, [branch]).eval()
    module = ClonedModule(ZooRef.of(ms), (0, 1), 3, 3, masks, branch_tensors(branch),
                          {"adapter_rank": 8, "gate_hidden": 8})
    return wire.encode(Package(ZooRef.of(mt), [module], sb.label_names, fingerprint_of(sb, shape)))


def short_rgb_clone(zoo: Zoo, target: str, source: str, position: tuple[int, int],
                    per_class: int = 4, target_per_class: int = 2):  # -> CloneResult
    """A clone of {5, 6} that checks mechanics, not accuracy: one position, a few colour
    digits (12/4/8 per class), 3 refinement steps, one adapter epoch, no inversion."""
    from pnc_net.cloning import CloneConfig, clone
    from pnc_net.data import load_rgb_digits
    from pnc_net.insert import InsertConfig
    from pnc_net.localize import LocalizeConfig

    cfg = CloneConfig.single(target, source, ("5", "6"), per_class=per_class,
                             target_per_class=target_per_class, positions=(position,),
                             synthesize=False, localize=LocalizeConfig(refine_steps=3),
                             insert=InsertConfig(epochs=1, gate_steps=10))
    return clone(zoo, load_rgb_digits(split=(12, 4, 8)), cfg)


def assert_round_trip(zoo: Zoo, package: Package, x: torch.Tensor) -> Superbody:
    """``package`` through the wire format, rebuilt and verified on a fresh instance of
    ``zoo`` (a receiver's), and detached to exactly the target; returns the rebuild."""
    from pnc_net.rebuild import verify

    decoded = wire.decode(wire.encode(package))
    fresh = Zoo(zoo.root)
    superbody, err = verify(fresh, decoded)
    assert decoded.fingerprint is not None and err <= decoded.fingerprint.tolerance, err
    target = fresh.load_module(decoded.target.name)[0]
    with torch.no_grad():
        assert superbody(x).shape == (len(x), len(superbody.label_names))
        detached = copy.deepcopy(superbody).detach()  # detach() empties the superbody
        assert torch.equal(detached(x), target(x))  # the exact target comes back
    return superbody

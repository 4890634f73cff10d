"""Helpers for checking a wrapped network, shared by the tests and ``bench/``
(as ``torch.testing`` is): models whose every wrong slice shows, and random masks.

At random init a BatchNorm is the identity (mean 0, variance 1, weight 1, bias 0),
so slicing one wrongly changes nothing and a pruning bug hides; these helpers give
every BatchNorm statistics and affine terms that differ per channel.
"""

from __future__ import annotations

import torch
from torch import nn


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

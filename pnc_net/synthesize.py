"""Data-free stand-ins for target-class samples, inverted from the target itself.

In the article's setting (``k_t = 0``) no target-class sample exists, yet the
fusion gate must learn to stay closed on them: without any, it learns "a digit
-> open" and steals most target inputs (locality 0.20 measured on cloning {7}).
The target's BatchNorm layers remember the mean and variance of its training
features, so inputs can be optimised until the target classifies them
confidently *and* reproduces those statistics (DeepInversion, Yin et al.,
CVPR 2020). These synthetic target samples serve as the gate's target-class
negatives. They are made on the sender from the zoo model alone, never leave
it, and the target is not modified (a private copy is inverted).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from pnc_net.devices import CPU, Compute
from pnc_net.models import ZooNet
from pnc_net.training import random_shift


@dataclass(frozen=True)
class SynthesizeConfig:
    """How many inputs per target class and how the inversion optimises them."""

    per_class: int = 20
    steps: int = 100
    lr: float = 0.2
    bn_weight: float = 0.5
    tv_weight: float = 0.05
    jitter: int = 2
    batch_size: int = 256  # inputs optimised together (their BatchNorm statistics are matched)


def _bn_statistics_loss(model: nn.Module,
                        ) -> tuple[list[RemovableHandle], list[torch.Tensor]]:
    """Forward hooks on every BatchNorm2d that append, per forward, how far its input's
    batch statistics are from its running ones; returns (handles, the list they fill)."""
    losses: list[torch.Tensor] = []

    def hook(module: nn.BatchNorm2d, inputs, _out) -> None:
        x = inputs[0]
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        losses.append((mean - module.running_mean).norm() + (var - module.running_var).norm())

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.BatchNorm2d)]
    return handles, losses


class SynthesisCache:
    """Memo of inverted samples by (target digest, classes, shape, config, seed).

    Inversion is a pure function of those, and benchmarks and batch jobs clone
    into the same target many times; a few hundred small images per entry.
    """

    def __init__(self, max_entries: int = 16) -> None:
        self.max_entries = max_entries
        self._entries: dict[tuple, torch.Tensor] = {}

    def get_or_make(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A copy of the entry for ``key``, made first if missing (oldest entry evicted)."""
        if key not in self._entries:
            if len(self._entries) >= self.max_entries:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = make()
        return self._entries[key].clone()


CACHE = SynthesisCache()


def cached_target_samples(target: ZooNet, target_sha256: str, num_classes: int,
                          input_shape: tuple[int, ...], cfg: SynthesizeConfig,
                          seed: int, compute: Compute = CPU) -> torch.Tensor:
    """``synthesize_target_samples`` through ``CACHE`` (zoo models are identified by digest;
    the device is part of the key: another device gives other floats)."""
    key = (target_sha256, num_classes, tuple(input_shape), cfg, seed,
           *(() if compute == CPU else (compute,)))
    return CACHE.get_or_make(key, lambda: synthesize_target_samples(
        target, num_classes, input_shape, cfg, seed, compute))


def synthesize_target_samples(target: ZooNet, num_classes: int, input_shape: tuple[int, ...],
                              cfg: SynthesizeConfig | None = None, seed: int = 0,
                              compute: Compute = CPU) -> torch.Tensor:
    """``(num_classes * per_class, *input_shape)`` inputs in [0, 1] that the target
    reads confidently as each of its classes, with its training feature statistics.

    The inputs are optimised ``cfg.batch_size`` at a time, so memory does not grow
    with the number of classes. A target without BatchNorm (a LayerNorm ViT) keeps
    no training statistics: its inversion has only the class and smoothness terms,
    which gives less natural stand-ins (``docs/method.md``, k_t = 0).

    The inversion runs on ``compute.device`` (a private copy of the target); the
    starting noise and the jitter are drawn on the CPU, and the inputs come back there."""
    cfg = cfg or SynthesizeConfig()
    gen = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(target).to(compute.device).eval()
    y = torch.arange(num_classes).repeat(cfg.per_class)
    # in batches: a batch's statistics are what the BatchNorm term matches, and one
    # batch of every class x per_class would not fit in memory for a large target
    return torch.cat([_invert(model, y[i : i + cfg.batch_size], input_shape, cfg, gen, compute)
                      for i in range(0, len(y), cfg.batch_size)])


def _invert(model: nn.Module, y: torch.Tensor, input_shape: tuple[int, ...],
            cfg: SynthesizeConfig, gen: torch.Generator, compute: Compute = CPU) -> torch.Tensor:
    """Inputs in [0, 1] that ``model`` reads as ``y``, one batch optimised together."""
    raw = compute.put(torch.randn(len(y), *input_shape, generator=gen) - 1.5).requires_grad_(True)
    y = compute.put(y)
    opt = torch.optim.Adam([raw], lr=cfg.lr)
    handles, bn_losses = _bn_statistics_loss(model)
    try:
        for _ in range(cfg.steps):
            x = torch.sigmoid(raw)
            bn_losses.clear()
            logits = model(random_shift(x, cfg.jitter, gen))
            tv = (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (
                x[..., :, 1:] - x[..., :, :-1]).abs().mean()
            loss = F.cross_entropy(logits, y) + cfg.bn_weight * sum(bn_losses) + cfg.tv_weight * tv
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        for h in handles:
            h.remove()
    return torch.sigmoid(raw).detach().cpu()

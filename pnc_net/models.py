"""Zoo architectures behind one block-boundary interface.

Every network is ``blocks[0..L-1]`` followed by a ``head`` (global average
pool + linear). A *block boundary* ``r`` (0..L) is the feature map after the
first ``r`` blocks, so insertion and search (``docs/method.md``) never
special-case an architecture: they call ``forward_features(x, r)`` and
``forward_from(h, r)`` and read ``feature_info``.

Per-filter masks act on *mask units*: the output channels of each plain conv
block, and the middle channels of each residual block (a residual stream's
channels are shared by every block that adds to it, so they are not pruned).
A ``ChannelGate`` after each unit multiplies its channels by a gate vector
during localization; ``pruned_tail`` physically removes dropped channels.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from pnc_net.errors import InvalidInputError


class ChannelGate(nn.Module):
    """Multiplies channels by ``gate`` (None = identity).

    ``gate`` is ``(c,)`` (one mask for the batch) or ``(b, c)`` (one per sample:
    localization's Taylor scores are the gradients of a ``(b, c)`` gate of ones).
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.gate: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, c, h, w)
        """``x`` times the gate, broadcast over the spatial dimensions."""
        if self.gate is None:
            return x
        g = self.gate
        return x * g.reshape(*g.shape, *([1] * (x.dim() - 2)))


def _slice_bn(bn: nn.BatchNorm2d, keep: torch.Tensor) -> nn.BatchNorm2d:
    out = nn.BatchNorm2d(len(keep), eps=bn.eps, momentum=bn.momentum)
    out.weight.data = bn.weight.data[keep].clone()
    out.bias.data = bn.bias.data[keep].clone()
    # zoo blocks build their BatchNorms with the defaults: affine, tracking running stats
    assert bn.running_mean is not None and bn.running_var is not None
    out.running_mean = bn.running_mean[keep].clone()
    out.running_var = bn.running_var[keep].clone()
    return out.eval()


def _slice_conv(conv: nn.Conv2d, out_keep: torch.Tensor | None,
                in_keep: torch.Tensor | None) -> nn.Conv2d:
    w = conv.weight.data
    if out_keep is not None:
        w = w[out_keep]
    if in_keep is not None:
        w = w[:, in_keep]
    # torch's stubs type a Conv2d's sizes as tuple[int, ...]; a Conv2d's are pairs
    out = nn.Conv2d(w.shape[1], w.shape[0], cast(tuple[int, int], conv.kernel_size),
                    cast(tuple[int, int], conv.stride),
                    cast("str | tuple[int, int]", conv.padding), bias=conv.bias is not None)
    out.weight.data = w.clone()
    if conv.bias is not None and out.bias is not None:
        b = conv.bias.data
        out.bias.data = (b[out_keep] if out_keep is not None else b).clone()
    return out


class Block(nn.Module):
    """What every zoo block offers besides ``forward``: its mask units and a pruned copy."""

    def mask_gates(self) -> dict[str, ChannelGate]:
        """The block's mask units by local name (``"out"``, ``"mid"``); empty if none."""
        raise NotImplementedError

    def pruned(self, in_keep: torch.Tensor | None, masks: dict[str, torch.Tensor],
               ) -> tuple[Block, torch.Tensor | None]:
        """A copy without dropped channels; returns (block, kept output channels or None)."""
        raise NotImplementedError


class ConvBlock(Block):
    """conv3x3 -> BN -> ReLU -> gate [-> 2x2 max-pool]. Its output channels are a mask unit."""

    def __init__(self, cin: int, cout: int, pool: bool, maskable: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.gate = ChannelGate(cout)
        self.pool = pool
        self.maskable = maskable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output feature map (halved in size when it pools)."""
        x = self.gate(F.relu(self.bn(self.conv(x))))
        return F.max_pool2d(x, 2) if self.pool else x

    def mask_gates(self) -> dict[str, ChannelGate]:
        """``{"out": gate}``, or nothing for a stem that must keep every channel."""
        return {"out": self.gate} if self.maskable else {}

    def pruned(self, in_keep: torch.Tensor | None, masks: dict[str, torch.Tensor],
               ) -> tuple[ConvBlock, torch.Tensor | None]:
        """A copy without dropped channels; returns (block, kept output channels or None)."""
        keep = torch.nonzero(masks["out"]).flatten() if "out" in masks else None
        block = ConvBlock.__new__(ConvBlock)
        nn.Module.__init__(block)
        block.conv = _slice_conv(self.conv, keep, in_keep)
        block.bn = _slice_bn(self.bn, keep) if keep is not None else copy.deepcopy(self.bn)
        block.gate = ChannelGate(block.conv.out_channels)
        block.pool, block.maskable = self.pool, self.maskable
        return block, keep


class ResBlock(Block):
    """torchvision's ``BasicBlock`` with a gate on its middle channels (the mask unit)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        # Imported here: importing torchvision costs about as much as importing torch,
        # and most CLI commands (errors, zoo list, inspect) never build a ResNet.
        from torchvision.models.resnet import BasicBlock, conv1x1

        super().__init__()
        downsample = None
        if stride != 1 or cin != cout:
            downsample = nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
        self.body = BasicBlock(cin, cout, stride=stride, downsample=downsample)
        self.gate = ChannelGate(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``BasicBlock.forward`` with the gate applied after the first ReLU."""
        b = self.body
        out = self.gate(F.relu(b.bn1(b.conv1(x))))
        out = b.bn2(b.conv2(out))
        identity = x if b.downsample is None else b.downsample(x)
        return F.relu(out + identity)

    def mask_gates(self) -> dict[str, ChannelGate]:
        """``{"mid": gate}``: only the middle channels; the residual stream is shared."""
        return {"mid": self.gate}

    def pruned(self, in_keep: torch.Tensor | None, masks: dict[str, torch.Tensor],
               ) -> tuple[ResBlock, None]:
        """A copy with dropped middle channels removed; its output stream stays whole (None).

        Raises:
            InvalidInputError: ``in_keep`` is given (a residual stream cannot be pruned).
        """
        if in_keep is not None:
            raise InvalidInputError("a residual block cannot take a pruned input stream")
        keep = torch.nonzero(masks["mid"]).flatten() if "mid" in masks else None
        block = copy.deepcopy(self)
        if keep is not None:
            block.body.conv1 = _slice_conv(self.body.conv1, keep, None)
            block.body.bn1 = _slice_bn(self.body.bn1, keep)
            block.body.conv2 = _slice_conv(self.body.conv2, None, keep)
            block.gate = ChannelGate(len(keep))
        return block, None


class Head(nn.Module):
    """Global average pool + linear classifier."""

    def __init__(self, cin: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(b, classes)`` of a feature map ``(b, c, h, w)``."""
        return self.fc(self.features(x))

    @staticmethod
    def features(x: torch.Tensor) -> torch.Tensor:  # (b, c, h, w) -> (b, c): penultimate
        """The penultimate features: the globally average-pooled map."""
        return x.mean(dim=(2, 3))

    def pruned(self, in_keep: torch.Tensor | None) -> Head:
        """A copy reading only the kept input channels (None = all: a plain copy)."""
        head = copy.deepcopy(self)
        if in_keep is not None:
            head.fc = nn.Linear(len(in_keep), self.fc.out_features)
            head.fc.weight.data = self.fc.weight.data[:, in_keep].clone()
            head.fc.bias.data = self.fc.bias.data.clone()
        return head


@dataclass(frozen=True)
class FeatureInfo:
    """What a block boundary looks like for a given input shape."""

    boundary: int  # r: the output of blocks[0..r-1]
    channels: int
    spatial: tuple[int, int]
    masked_by: str | None  # the mask unit that prunes these channels, if any


class ZooNet(nn.Module):
    """A zoo network: blocks + head, with masks addressed as ``"blocks.{i}.{unit}"``."""

    def __init__(self, blocks: Sequence[Block], head: Head) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    @property
    def num_blocks(self) -> int:
        """``L``: the last block boundary."""
        return len(self.blocks)

    def block(self, i: int) -> Block:
        """Block ``i`` as a ``Block`` (``nn.ModuleList`` hands out plain modules)."""
        return cast(Block, self.blocks[i])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the whole network."""
        return self.forward_from(self.forward_features(x, self.num_blocks), self.num_blocks)

    def forward_features(self, x: torch.Tensor, upto: int, start: int = 0) -> torch.Tensor:
        """Run blocks ``start..upto-1``: boundary ``start`` in, boundary ``upto`` out."""
        for block in self.blocks[start:upto]:
            x = block(x)
        return x

    def pooled(self, h: torch.Tensor, boundary: int) -> torch.Tensor:
        """The features ``h`` at ``boundary`` averaged over space, ``(b, channels)``: what
        a discriminant gate's taps read (``superbody.DiscriminantGate``)."""
        return h.mean((2, 3))

    def forward_from(self, h: torch.Tensor, start: int) -> torch.Tensor:
        """Logits from the features at boundary ``start``."""
        return self.head(self.forward_features(h, self.num_blocks, start))

    def mask_gates(self) -> dict[str, ChannelGate]:
        """Every mask unit, by its stable name (the names a package's masks use)."""
        return {f"blocks.{i}.{unit}": gate for i in range(self.num_blocks)
                for unit, gate in self.block(i).mask_gates().items()}

    def mask_widths(self) -> dict[str, int]:
        """Filters per mask unit: the shape every mask of this network must have."""
        return {name: gate.width for name, gate in self.mask_gates().items()}

    def set_gates(self, gates: dict[str, torch.Tensor] | None) -> None:
        """Gate each unit by ``gates[name]`` (units not named, or ``None``, run ungated)."""
        for name, gate in self.mask_gates().items():
            gate.gate = None if gates is None else gates.get(name)

    def feature_info(self, input_shape: tuple[int, ...]) -> list[FeatureInfo]:
        """Channels, spatial size and masking unit at every boundary 0..L."""
        with torch.no_grad():
            h = torch.zeros(1, *input_shape, device=next(self.parameters()).device)
            infos = [FeatureInfo(0, h.shape[1], (h.shape[2], h.shape[3]), None)]
            for i in range(self.num_blocks):
                block = self.block(i)
                h = block(h)
                unit = "out" if "out" in block.mask_gates() else None
                infos.append(FeatureInfo(i + 1, h.shape[1], (h.shape[2], h.shape[3]),
                                         f"blocks.{i}.{unit}" if unit else None))
        return infos

    def pruned_tail(self, start: int, masks: dict[str, torch.Tensor],
                    ) -> tuple[nn.ModuleList, Head, torch.Tensor | None]:
        """Blocks ``start..L-1`` and the head with dropped channels removed.

        Returns the pruned blocks, the pruned head, and the kept channels at
        boundary ``start`` (None = all), which is what the adapter must produce.
        """
        in_name = f"blocks.{start - 1}.out"
        in_keep = torch.nonzero(masks[in_name]).flatten() if start > 0 and in_name in masks else None
        first_keep = in_keep
        blocks = []
        for i in range(start, self.num_blocks):
            local = {k.split(".")[-1]: v for k, v in masks.items() if k.startswith(f"blocks.{i}.")}
            block, in_keep = self.block(i).pruned(in_keep, local)
            blocks.append(block)
        return nn.ModuleList(blocks), self.head.pruned(in_keep), first_keep


# ----------------------------------------------------------------------------- registry

ARCHITECTURES: dict[str, Callable[..., ZooNet]] = {}


def register(name: str) -> Callable[[Callable[..., ZooNet]], Callable[..., ZooNet]]:
    """Decorator adding an architecture builder to the registry (duplicates are an error)."""

    def wrap(fn: Callable[..., ZooNet]) -> Callable[..., ZooNet]:
        if name in ARCHITECTURES:
            raise ValueError(f"architecture {name!r} is registered twice")
        ARCHITECTURES[name] = fn
        return fn

    return wrap


@register("cnn")
def cnn(in_channels: int = 1, num_classes: int = 10, widths: tuple = (32, 64, 128, 128)) -> ZooNet:
    """A small VGG-style CNN: four conv blocks, the first two downsampling."""
    blocks, cin = [], in_channels
    for i, w in enumerate(widths):
        blocks.append(ConvBlock(cin, w, pool=i < 2))
        cin = w
    return ZooNet(blocks, Head(cin, num_classes))


@register("resnet")
def resnet(in_channels: int = 1, num_classes: int = 10, widths: tuple = (32, 32, 64, 128)) -> ZooNet:
    """A ResNet-style network from torchvision's ``BasicBlock``: a stem and three stages."""
    stem = ConvBlock(in_channels, widths[0], pool=False, maskable=False)
    blocks: list[Block] = [stem]
    cin = widths[0]
    for i, w in enumerate(widths[1:]):
        blocks.append(ResBlock(cin, w, stride=1 if i == 0 else 2))
        cin = w
    return ZooNet(blocks, Head(cin, num_classes))


def build_model(arch: str, **kwargs) -> ZooNet:
    """Instantiate a registered architecture; unknown names list the known ones."""
    if arch not in ARCHITECTURES:
        raise InvalidInputError(
            f"unknown architecture {arch!r}; choose one of {', '.join(sorted(ARCHITECTURES))}"
        )
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return ARCHITECTURES[arch](**kwargs)

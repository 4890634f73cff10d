"""Small training and inference helpers shared by the zoo, cloning and baselines."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pnc_net.data import Images, iter_batches
from pnc_net.devices import CPU, Compute

ModuleT = TypeVar("ModuleT", bound=nn.Module)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads, then restore the caller's count.

    A CPU reduction splits its work by the thread count, so two runs agree bit for
    bit only under the same count, and work run in process (a bench cell, a test)
    must leave the process's count as it found it.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels (zero fill): cheap, label-preserving.

    The shifts are drawn on ``gen`` (a CPU generator) and moved to ``x``'s device, so
    a seed shifts the same way on every device."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    dev = x.device
    pad = F.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen).to(dev)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen).to(dev)
    rows = (dy.view(b, 1) + torch.arange(h, device=dev).view(1, h)).view(b, 1, h, 1)
    cols = (dx.view(b, 1) + torch.arange(w, device=dev).view(1, w)).view(b, 1, 1, w)
    bidx = torch.arange(b, device=dev).view(b, 1, 1, 1)
    return pad[bidx, torch.arange(x.shape[1], device=dev).view(1, -1, 1, 1), rows, cols]


def batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Index tensors of one shuffled epoch over ``n`` samples (the last batch may be short)."""
    perm = torch.randperm(n, generator=gen)
    for i in range(0, n, batch_size):
        yield perm[i : i + batch_size]


@torch.no_grad()
def predict_logits(model: Callable[[torch.Tensor], torch.Tensor], x: Images,
                   batch_size: int = 512, index: torch.Tensor | None = None,
                   compute: Compute = CPU) -> torch.Tensor:
    """Logits of ``model`` over ``x`` (or ``x[index]``) in eval mode, a batch at a time.

    ``model`` must already be on ``compute.device``; each batch is moved there and
    the logits come back to the CPU as fp32 (bf16 autocast only when asked for)."""
    if isinstance(model, nn.Module):
        model.eval()
    outs = []
    for xb in iter_batches(x, index, batch_size, compute.device):
        with compute.autocast():
            out = model(xb)
        outs.append(out if compute.is_cpu else out.float().cpu())
    return torch.cat(outs) if outs else torch.zeros(0)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``logits`` against ``y``; NaN when there are no samples."""
    return float((logits.argmax(1) == y).float().mean()) if len(y) else float("nan")


AUGMENTS = ("affine", "permute", "invert")  # what random_augment can do besides shifts
AFFINE_RADIANS = 0.2  # rotations up to +-11.5 degrees
AFFINE_SCALE = 0.1  # zoom in or out by up to 10%


def random_augment(x: torch.Tensor, transforms: tuple[str, ...] | list[str],
                   gen: torch.Generator) -> torch.Tensor:
    """Each image through ``transforms``, drawn per image, in ``AUGMENTS``' order:

    - ``"affine"``: a rotation up to ``AFFINE_RADIANS`` and a zoom up to ``AFFINE_SCALE``
      about the centre (zero fill, as ``random_shift``);
    - ``"permute"``: its channels in a random order (a no-op for one channel);
    - ``"invert"``: with probability 1/2, ``1 - x`` (pixels are in [0, 1]).

    Each is label-preserving only for some data: inversion is for the rgb digits, whose
    colours say nothing of the class, not for MNIST, whose networks have only seen white
    on black. So which ones a clone uses is measured on its own networks
    (``insert.augment_transforms``), not assumed. Draws on ``gen`` (a CPU generator)
    only for the transforms given: with none, ``x`` comes back and ``gen`` is untouched."""
    for name in AUGMENTS:
        if name in transforms:
            x = _TRANSFORMS[name](x, gen)
    return x


def _random_affine(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    b = len(x)
    angle = (torch.rand(b, generator=gen) * 2 - 1) * AFFINE_RADIANS
    zoom = 1 + (torch.rand(b, generator=gen) * 2 - 1) * AFFINE_SCALE
    cos, sin, zero = torch.cos(angle) / zoom, torch.sin(angle) / zoom, torch.zeros(b)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


def _random_channel_order(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    b, c = x.shape[:2]
    if c == 1:
        return x
    orders = torch.argsort(torch.rand(b, c, generator=gen), dim=1).to(x.device)
    return x[torch.arange(b, device=x.device).view(b, 1), orders]


def _random_inversion(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(len(x), generator=gen) < 0.5).to(x.device).view(-1, *[1] * (x.dim() - 1))
    return torch.where(flip, 1 - x, x)


_TRANSFORMS = {"affine": _random_affine, "permute": _random_channel_order,
               "invert": _random_inversion}


#: the one-pixel offsets (dx, dy) of ``fixed_views``, one per view in turn
VIEW_SHIFTS = ((1, 0), (0, 1), (-1, 0), (0, -1), (1, 1), (-1, -1), (1, -1), (-1, 1))


def fixed_views(x: torch.Tensor, transforms: tuple[str, ...] | list[str],
                n: int) -> list[torch.Tensor]:
    """``n`` views of every image, each view the same for every image and every machine
    (what a gate's second look reads, ``superbody.Superbody.parts``): view ``i`` shifts by
    ``VIEW_SHIFTS[i % 8]`` (zero fill), then, among ``transforms``, rotates by
    ``AFFINE_RADIANS / 2`` (anticlockwise for even ``i``), rolls the channels by
    ``1 + i % (c - 1)`` and inverts for even ``i``. Random views would make an input's
    answer depend on its place in a batch; these are what ``random_augment`` draws from,
    at fixed points."""
    views = []
    for i in range(n):
        dx, dy = VIEW_SHIFTS[i % len(VIEW_SHIFTS)]
        v = F.pad(x, (1, 1, 1, 1))[..., 1 - dy : 1 - dy + x.shape[-2], 1 - dx : 1 - dx + x.shape[-1]]
        if "affine" in transforms:
            angle = torch.tensor(AFFINE_RADIANS / 2 * (1 if i % 2 == 0 else -1))
            cos, sin = float(torch.cos(angle)), float(torch.sin(angle))
            theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype, device=x.device)
            grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
            v = F.grid_sample(v, grid, padding_mode="zeros", align_corners=False)
        if "permute" in transforms and x.shape[1] > 1:
            v = v.roll(1 + i % (x.shape[1] - 1), dims=1)
        if "invert" in transforms and i % 2 == 0:
            v = 1 - v
        views.append(v.contiguous())
    return views


def train_classifier(model: ModuleT, x: torch.Tensor, y: torch.Tensor, *, epochs: int,
                     lr: float, batch_size: int = 64, max_shift: int = 2,
                     augment: tuple[str, ...] = (), seed: int = 0,
                     desc: str = "train", progress: bool = True,
                     extra_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                     params: list[nn.Parameter] | None = None,
                     recalibrate_bn: bool = True, compute: Compute = CPU) -> ModuleT:
    """Cross-entropy training with Adam, cosine decay and shift augmentation (then the
    ``augment`` transforms of ``random_augment``, if any).

    ``extra_loss(x_batch, logits)`` adds a term (distillation for LwF/KD).
    ``recalibrate_bn`` ends with exact BatchNorm statistics over ``x``
    (``recalibrate_batchnorm``), so short runs give a usable eval-mode model.
    ``model`` must be on ``compute.device`` already; ``x`` and ``y`` stay on the CPU
    and each batch moves (the shuffles and shifts are drawn on a CPU generator).
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)
    model.train()
    for _ in range(epochs):
        for idx in batches(len(x), batch_size, gen):
            xb = random_augment(random_shift(compute.put(x[idx]), max_shift, gen), augment, gen)
            with compute.autocast(training=True):
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), compute.put(y[idx]))
            if extra_loss is not None:
                loss = loss + extra_loss(xb, logits)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    if recalibrate_bn:
        recalibrate_batchnorm(model, x, batch_size, compute)
    return model.eval()


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 64,
                          compute: Compute = CPU) -> None:
    """Set every BatchNorm's running statistics to their exact mean over ``x``.

    With momentum 0.1 the running statistics trail the weights by about ten
    steps; after a short run (a user's small data set: tens of steps) they still
    describe an early network, and the eval-mode model can sit at chance while
    the train-mode one is accurate. One pass with a cumulative average fixes it.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats]
    if not bns or not len(x):
        return
    saved = [(m, m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
        m.train()
    try:
        for i in range(0, len(x), batch_size):
            model(compute.put(x[i : i + batch_size]))
    finally:
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)

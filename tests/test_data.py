"""The embedded MNIST split and the user ``.npz`` loader, including every malformed file."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from pnc_net.data import MNIST_SPLIT, load_dataset, load_mnist, load_npz, select_classes
from pnc_net.errors import InvalidInputError, NotFoundError, PncError

# ----------------------------------------------------------------------------- MNIST


def _row_hashes(x: torch.Tensor) -> set[str]:
    return {hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in x}


def test_mnist_split_sizes_per_class(mnist):
    assert MNIST_SPLIT == (350, 50, 100)
    for split, n in zip(("train", "val", "test"), MNIST_SPLIT):
        x, y = mnist.split(split)
        assert x.shape == (10 * n, 1, 28, 28)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.bincount(y, minlength=10).tolist() == [n] * 10
    assert mnist.label_names == tuple(str(i) for i in range(10))
    assert mnist.input_shape == (1, 28, 28)
    assert float(mnist.x_train.min()) >= 0.0 and float(mnist.x_train.max()) <= 1.0
    assert float(mnist.x_train.max()) > 0.9  # really scaled from 0..255, not left at 0..1/255


def test_mnist_splits_are_disjoint(mnist):
    train, val, test = (_row_hashes(mnist.split(s)[0]) for s in ("train", "val", "test"))
    assert not train & test and not train & val and not val & test


def test_mnist_is_shuffled(mnist):
    # The file is sorted by class: a shuffled split mixes classes from the start.
    for split in ("train", "val", "test"):
        y = mnist.split(split)[1]
        assert len(set(y[:50].tolist())) >= 5
        assert not torch.equal(y, torch.sort(y).values)


def test_mnist_is_deterministic(mnist):
    again = load_mnist()
    for split in ("train", "val", "test"):
        assert torch.equal(mnist.split(split)[0], again.split(split)[0])
        assert torch.equal(mnist.split(split)[1], again.split(split)[1])
    other = load_mnist(seed=1)
    assert not torch.equal(mnist.y_train, other.y_train)


def test_load_dataset_none_is_mnist(mnist):
    assert load_dataset(None).name == "mnist"


def test_label_index_unknown_label(mnist):
    assert mnist.label_index("7") == 7
    with pytest.raises(InvalidInputError, match="'x' is not in dataset"):
        mnist.label_index("x")


def test_select_classes_budget_and_seed(mnist):
    x, y = select_classes(mnist.x_train, mnist.y_train, [5, 6], per_class=7, seed=3)
    assert len(x) == 14 and sorted(set(y.tolist())) == [5, 6]
    x2, _ = select_classes(mnist.x_train, mnist.y_train, [5, 6], per_class=7, seed=3)
    assert torch.equal(x, x2)
    x3, _ = select_classes(mnist.x_train, mnist.y_train, [5, 6], per_class=7, seed=4)
    assert not torch.equal(x, x3)


# ----------------------------------------------------------------------------- .npz happy paths


def _arrays(n_train=30, n_test=12, shape=(8, 8), dtype=np.uint8, classes=3, seed=0) -> dict:
    rng = np.random.default_rng(seed)

    def images(n):
        if dtype == np.uint8:
            return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
        return rng.random(size=(n, *shape)).astype(dtype)

    return {"x_train": images(n_train), "y_train": np.arange(n_train) % classes,
            "x_test": images(n_test), "y_test": np.arange(n_test) % classes}


def _write(tmp_path, name="d.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_npz_nhw_uint8(tmp_path):
    arrays = _arrays()
    data = load_npz(_write(tmp_path, **arrays))
    assert data.name == "d"
    assert data.input_shape == (1, 8, 8)
    assert data.x_train.dtype == torch.float32
    assert len(data.x_train) + len(data.x_val) == 30  # 10% held out for validation
    assert len(data.x_val) == 3
    assert data.label_names == ("0", "1", "2")
    expected = torch.from_numpy(arrays["x_test"].astype(np.float32) / 255.0).unsqueeze(1)
    assert torch.equal(data.x_test, expected)
    assert torch.equal(data.y_test, torch.from_numpy(arrays["y_test"]).long())
    # The held-out validation samples are train samples, not new ones, and none is lost.
    all_train = _row_hashes(torch.cat([data.x_train, data.x_val]))
    src = _row_hashes(torch.from_numpy(arrays["x_train"].astype(np.float32) / 255.0).unsqueeze(1))
    assert all_train == src


def test_npz_nchw_float_keeps_values(tmp_path):
    arrays = _arrays(shape=(3, 6, 5), dtype=np.float32)
    arrays["x_train"] *= 4.0  # floats are taken as they are, not rescaled
    data = load_npz(_write(tmp_path, **arrays))
    assert data.input_shape == (3, 6, 5)
    assert torch.equal(data.x_test, torch.from_numpy(arrays["x_test"]))
    assert float(torch.cat([data.x_train, data.x_val]).max()) > 1.0


def test_npz_float64_becomes_float32(tmp_path):
    data = load_npz(_write(tmp_path, **_arrays(dtype=np.float64)))
    assert data.x_train.dtype == torch.float32


def test_npz_optional_val_and_label_names(tmp_path):
    arrays = _arrays(classes=3)
    arrays["x_val"] = arrays["x_test"][:5]
    arrays["y_val"] = arrays["y_test"][:5]
    arrays["label_names"] = np.array(["cat", "dog", "emu", "fox"])  # a label with no samples
    data = load_npz(_write(tmp_path, **arrays))
    assert data.label_names == ("cat", "dog", "emu", "fox")
    assert len(data.x_train) == 30 and len(data.x_val) == 5  # nothing held out
    assert data.label_index("emu") == 2


def test_npz_same_seed_same_validation(tmp_path):
    path = _write(tmp_path, **_arrays())
    a, b = load_npz(path), load_npz(path)
    assert torch.equal(a.x_val, b.x_val)


# ----------------------------------------------------------------------------- malformed .npz


def _expect(tmp_path, match, exc=InvalidInputError, **arrays):
    with pytest.raises(exc, match=match) as info:
        load_npz(_write(tmp_path, **arrays))
    msg = str(info.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("drop", ["x_train", "y_train", "x_test", "y_test"])
def test_npz_missing_array(tmp_path, drop):
    arrays = _arrays()
    del arrays[drop]
    msg = _expect(tmp_path, f"missing array.*{drop}", **arrays)
    assert "d.npz" in msg


def test_npz_missing_two_arrays_names_both(tmp_path):
    arrays = _arrays()
    del arrays["y_train"], arrays["x_test"]
    msg = _expect(tmp_path, "missing array", **arrays)
    assert "y_train" in msg and "x_test" in msg


def test_npz_val_without_labels(tmp_path):
    arrays = _arrays()
    arrays["x_val"] = arrays["x_test"]
    _expect(tmp_path, "both x_val and y_val", **arrays)


@pytest.mark.parametrize("split", ["train", "test"])
def test_npz_mismatched_lengths(tmp_path, split):
    arrays = _arrays()
    arrays[f"y_{split}"] = arrays[f"y_{split}"][:-2]
    msg = _expect(tmp_path, f"y_{split}", **arrays)
    assert "labels but the images have" in msg


@pytest.mark.parametrize("shape", [(30, 64), (30,), (30, 1, 1, 8, 8)])
def test_npz_wrong_image_rank(tmp_path, shape):
    arrays = _arrays()
    arrays["x_train"] = np.zeros(shape, dtype=np.uint8)
    _expect(tmp_path, f"x_train.*rank {len(shape)}", **arrays)


def test_npz_labels_not_1d(tmp_path):
    arrays = _arrays()
    arrays["y_train"] = arrays["y_train"].reshape(-1, 1)
    _expect(tmp_path, "y_train.*1-D", **arrays)


def test_npz_labels_out_of_range_with_names(tmp_path):
    arrays = _arrays(classes=3)
    arrays["label_names"] = np.array(["a", "b"])
    msg = _expect(tmp_path, r"out of range \[0, 2\)", **arrays)
    assert "max 2" in msg


def test_npz_negative_labels(tmp_path):
    arrays = _arrays()
    arrays["y_test"] = arrays["y_test"] - 1
    _expect(tmp_path, "y_test.*out of range.*min -1", **arrays)


def test_npz_float_labels(tmp_path):
    arrays = _arrays()
    arrays["y_train"] = arrays["y_train"].astype(np.float32)
    _expect(tmp_path, "labels must be integers", **arrays)


def test_npz_bad_image_dtype(tmp_path):
    arrays = _arrays()
    arrays["x_test"] = arrays["x_test"].astype(np.int32)
    _expect(tmp_path, "x_test.*dtype int32", **arrays)


def test_npz_nan_images(tmp_path):
    arrays = _arrays(dtype=np.float32)
    arrays["x_train"][0, 0, 0] = np.nan
    _expect(tmp_path, "NaN", **arrays)


def test_npz_image_shapes_differ_between_splits(tmp_path):
    arrays = _arrays()
    arrays["x_test"] = np.zeros((12, 9, 9), dtype=np.uint8)
    _expect(tmp_path, "image shapes differ", **arrays)


def test_npz_pickled_label_names_is_a_clear_error(tmp_path):
    # An object array needs pickle, which pnc refuses to load: a clear error, not a crash.
    arrays = _arrays()
    arrays["label_names"] = np.array(["a", "b", "c"], dtype=object)
    msg = _expect(tmp_path, "not a readable .npz", **arrays)
    assert "object arrays" in msg


def test_npz_duplicate_label_names(tmp_path):
    arrays = _arrays()
    arrays["label_names"] = np.array(["a", "b", "a"])
    _expect(tmp_path, "label_names.*repeat", **arrays)


def test_npz_empty_train_split(tmp_path):
    arrays = _arrays()
    arrays["x_train"] = arrays["x_train"][:0]
    arrays["y_train"] = arrays["y_train"][:0]
    _expect(tmp_path, "x_train.*no samples", **arrays)


def test_npz_not_a_zip(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"this is not an npz file at all")
    with pytest.raises(InvalidInputError, match="not a readable .npz"):
        load_npz(path)


def test_npz_missing_file(tmp_path):
    with pytest.raises(NotFoundError, match="does not exist"):
        load_npz(tmp_path / "nope.npz")


def test_npz_errors_are_pnc_errors_with_one_line(tmp_path):
    arrays = _arrays()
    arrays["y_train"] = arrays["y_train"][:-1]
    with pytest.raises(PncError) as info:
        load_npz(_write(tmp_path, **arrays))
    assert "\n" not in str(info.value)
    assert info.value.exit_code != 0

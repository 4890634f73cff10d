"""Streaming (issue 11): an ImageFolder stays on disk until a pass reaches it, every pass
over a split goes a batch at a time, and the streamed figures equal the in-memory ones."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pnc_net import data as data_mod
from pnc_net.data import Dataset, iter_batches, load_dataset
from pnc_net.datasources import LazyImages
from pnc_net.errors import InvalidInputError


def _digits_folder(root: Path, mnist: Dataset, per_class: dict[str, int]) -> Path:
    """``root/SPLIT/CLASS/i.png`` from the real digits (8-bit, as MNIST is)."""
    for split, n in per_class.items():
        x, y = mnist.split(split)
        for c in range(10):
            folder = root / split / str(c)
            folder.mkdir(parents=True)
            for i, img in enumerate(x[y == c][:n]):
                pixels = (img[0].numpy() * 255).round().astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory, mnist) -> Path:
    return _digits_folder(tmp_path_factory.mktemp("digits"), mnist,
                          {"train": 30, "val": 6, "test": 40})


def _in_memory(ds: Dataset) -> Dataset:
    return dataclasses.replace(ds, **{f"x_{s}": ds.split(s)[0][:] for s in ("train", "val", "test")})


def test_an_imagefolder_is_read_lazily_and_indexes_like_a_tensor(folder):
    ds = load_dataset(folder)
    x = ds.x_test
    assert isinstance(x, LazyImages) and x.shape == (400, 1, 28, 28) and ds.input_shape == (1, 28, 28)
    whole = x.materialize()
    assert whole.dtype == torch.float32 and whole.shape == (400, 1, 28, 28)
    idx = torch.tensor([5, 0, 399])
    assert torch.equal(x[idx], whole[idx]) and torch.equal(x[3], whole[3])
    assert torch.equal(x[10:20], whole[10:20]) and torch.equal(x[ds.y_test == 7], whole[ds.y_test == 7])
    assert torch.equal(torch.cat([x, x]), torch.cat([whole, whole]))  # torch functions decode
    assert x[torch.zeros(0, dtype=torch.long)].shape == (0, 1, 28, 28)


@pytest.mark.parametrize("workers", [0, 1])
def test_iter_batches_streams_the_same_images_in_order(folder, monkeypatch, workers):
    monkeypatch.setattr(data_mod, "WORKER_THRESHOLD", 1 if workers else 10**9)
    monkeypatch.setenv("PNC_DATA_WORKERS", str(workers))
    x = load_dataset(folder).x_test
    index = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:130]
    got = list(iter_batches(x, index, batch_size=64))
    assert [len(b) for b in got] == [64, 64, 2]
    assert torch.equal(torch.cat(got), x.materialize()[index])
    assert [len(b) for b in iter_batches(x.materialize(), index, 64)] == [64, 64, 2]


def test_a_file_that_breaks_after_reading_fails_on_one_line(folder, tmp_path):
    root = _digits_folder(tmp_path / "d", load_dataset(folder), {"train": 3, "test": 3})
    ds = load_dataset(root)
    broken = ds.x_test.paths[0]
    Image.new("L", (9, 9)).save(broken, format="PNG")  # another size after the scan
    with pytest.raises(InvalidInputError, match="every image needs one size") as info:
        list(iter_batches(ds.x_test))
    assert "\n" not in str(info.value) and str(broken) in str(info.value)


def test_streamed_metrics_equal_the_in_memory_ones(default_clone, zoo, folder, monkeypatch):
    from pnc_net.metrics import clone_metrics, sim_matrix

    monkeypatch.setattr(data_mod, "WORKER_THRESHOLD", 1)  # DataLoader workers in the pass
    monkeypatch.setenv("PNC_DATA_WORKERS", "1")
    lazy = load_dataset(folder)
    memory = _in_memory(lazy)
    sb = default_clone.superbody
    streamed = clone_metrics(sb, lazy)
    assert streamed == clone_metrics(sb, memory) and "routing_error_old" in streamed
    source, _ = zoo.load("mnist-cnn-5to9")
    masks = default_clone.package.modules[0].masks
    assert sim_matrix(source, masks, lazy) == sim_matrix(source, masks, memory)


def test_a_clone_reads_only_its_budget_from_an_imagefolder(zoo, folder, monkeypatch):
    from pnc_net.cloning import CloneConfig, clone

    ds = load_dataset(folder)
    decoded: dict[str, set[int]] = {"train": set(), "val": set(), "test": set()}
    split_of = {id(ds.split(s)[0]): s for s in decoded}
    real = LazyImages.image

    def counting(self, i):
        decoded[split_of[id(self)]].add(i)
        return real(self, i)

    monkeypatch.setattr(LazyImages, "image", counting)
    cfg = CloneConfig.single("mnist-cnn-0to4", "mnist-cnn-5to9", ("5",), per_class=8,
                             target_per_class=2, positions=((3, 3),), synthesize=False)
    m = clone(zoo, ds, cfg).report["metrics"]
    assert 0 <= m["locality"] <= 1 and m["superbody_bytes"] > 0
    assert len(decoded["train"]) == 8 + 2 * 5  # k of the cloned class, k_t of each target class
    assert len(decoded["val"]) == 6 + 2 * 5  # min(k, 50) but the folder has 6 per class
    # the metrics read the target's and the cloned classes' test images, nothing else
    assert decoded["test"] == set(torch.nonzero(ds.y_test <= 5).flatten().tolist())


# ----------------------------------------------------------------------------- --batch-size


def test_with_batch_size_caps_every_step_and_keeps_smaller_ones():
    from pnc_net.cloning import CloneConfig

    cfg = CloneConfig.single("t", "s", ("5",))
    small = cfg.with_batch_size(100)
    assert (small.batch_size, small.localize.batch_size, small.insert.batch_size,
            small.insert.eval_batch_size) == (100, 100, 64, 100)
    assert cfg.with_batch_size(None) == cfg
    with pytest.raises(InvalidInputError, match="--batch-size must be at least 1"):
        cfg.with_batch_size(0)


def test_metrics_do_not_depend_on_the_batch_size(default_clone, mnist):
    from pnc_net.metrics import clone_metrics

    sb = default_clone.superbody
    a, b = clone_metrics(sb, mnist, batch_size=512), clone_metrics(sb, mnist, batch_size=37)
    assert a.keys() == b.keys()
    for k in a:  # another batch may round a kernel differently: at most one answer in a
        assert a[k] == pytest.approx(b[k], abs=2e-3), k  # thousand test digits moves


def test_a_clone_with_a_small_batch_size_runs_and_records_it(zoo, mnist):
    from pnc_net.cloning import CloneConfig, clone

    cfg = CloneConfig.single("mnist-cnn-0to4", "mnist-cnn-5to9", ("5",), per_class=10,
                             target_per_class=2, positions=((3, 3),),
                             synthesize=False).with_batch_size(16)
    result = clone(zoo, mnist, cfg)
    assert result.report["settings"]["batch_size"] == 16
    assert 0 <= result.report["metrics"]["acc_new"] <= 1

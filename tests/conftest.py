"""Shared fixtures: the real MNIST digits and one default zoo per test session.

The zoo is trained once per session (about a minute on 2 cores) into a temp
folder; set ``PNC_TEST_ZOO=DIR`` to reuse a zoo across runs while developing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
torch.set_num_threads(2)
DEFAULT_CLONE_THREADS = 2  # the count the shared default_clone ran under


@pytest.fixture(scope="session")
def mnist():
    from pnc_net.data import load_mnist

    return load_mnist()


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory, mnist) -> Path:
    from pnc_net.zoo import Zoo
    from pnc_net.zoo_train import build_default_zoo

    root = Path(os.environ["PNC_TEST_ZOO"]) if os.environ.get("PNC_TEST_ZOO") else (
        tmp_path_factory.mktemp("zoo"))
    build_default_zoo(Zoo(root), mnist, progress=False)
    return root


@pytest.fixture()
def zoo(zoo_dir):
    from pnc_net.zoo import Zoo

    return Zoo(zoo_dir)


@pytest.fixture(scope="session")
def default_clone(zoo_dir, mnist):
    """One real clone of the default task with small budgets, shared by many tests."""
    from pnc_net.cloning import CloneConfig, clone
    from pnc_net.training import torch_threads
    from pnc_net.zoo import Zoo

    cfg = CloneConfig.single("mnist-cnn-0to4", "mnist-cnn-5to9", ("5", "6"), per_class=40,
                             target_per_class=10, positions=((3, 3),))
    with torch_threads(DEFAULT_CLONE_THREADS):  # tests that re-run it compare bit for bit
        return clone(Zoo(zoo_dir), mnist, cfg)


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that changes torch's thread count (a bench cell, a worker run in process)
    must not change the arithmetic, and so the bit-exact results, of the tests after it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)

"""One real local Ray cluster for the whole test run (Ray's own testing advice).

Import the fixture into a test module (``from ray_fixtures import ray_cluster``).
The cluster is pinned to 2 CPUs on loopback, without the dashboard; if a
cluster is already connected (another module imported this fixture), it is
reused and left running for whoever started it.
"""

from __future__ import annotations

import logging
import os

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield ray
        return
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level=logging.WARNING)
    try:
        yield ray
    finally:
        ray.shutdown()

"""A sender's queue: a package a receiver refuses for good never blocks the others.

Real sender and receiver daemons on 127.0.0.1 (issue 13, "poison package").
"""

from __future__ import annotations

import copy
import time

import pytest

from pnc_cli.daemons import spawn_daemon, stop_daemon
from pnc_net import wire
from pnc_net.fsutil import sha256_bytes
from pnc_net.serve.client import PncClient
from pnc_net.serve.store import PackageStore

pytestmark = pytest.mark.grpc


def _refused_package_sorting_first(package, good_id: str) -> bytes:
    """A package the receiver refuses (its source is a model no zoo has) whose id sorts
    before ``good_id``, so the sender meets it first."""
    bad = copy.deepcopy(package)
    bad.modules[0].source = type(package.target)("mnist-cnn-ghost", "e" * 64, 1234, "cnn")
    for i in range(10_000):
        bad.created_unix_s = 1.0 + i
        data = wire.encode(bad)
        if sha256_bytes(data) < good_id:
            return data
    raise AssertionError("no refused variant sorts first")


def test_a_refused_package_is_recorded_and_the_next_one_arrives(tmp_path, zoo_dir,
                                                                default_clone):
    good = wire.encode(default_clone.package)
    good_id = sha256_bytes(good)
    bad = _refused_package_sorting_first(default_clone.package, good_id)
    store = PackageStore(tmp_path / "send")
    bad_id = store.put(bad)
    store.put(good)
    recv, rport = spawn_daemon("receiver", ["--listen", "127.0.0.1:0", "--zoo", str(zoo_dir),
                                            "--store", str(tmp_path / "recv")])
    send, sport = spawn_daemon("sender", ["--listen", "127.0.0.1:0", "--store",
                                          str(tmp_path / "send"), "--push-to",
                                          f"127.0.0.1:{rport}", "--resync", "30"])
    try:
        with PncClient(f"127.0.0.1:{rport}") as r, PncClient(f"127.0.0.1:{sport}") as s:
            deadline = time.monotonic() + 60
            states: dict[str, str] = {}
            while time.monotonic() < deadline:
                states = {p.id: p.state for p in r.list()}
                detail = s.stat(bad_id).detail
                if states.get(good_id) == "verified" and detail:
                    break
                time.sleep(0.2)
            assert states == {good_id: "verified"}  # the refused one stored nothing
            assert f"127.0.0.1:{rport} refused it" in detail and "mnist-cnn-ghost" in detail
            assert s.stat(good_id).detail == ""
    finally:
        stop_daemon(send)
        stop_daemon(recv)

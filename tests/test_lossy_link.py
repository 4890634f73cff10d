"""A real receiver behind a slow, lossy link (tests/netem.py): 200 ms one way, 1 Mbit/s
each way, and a connection reset every 256 KB. A package arrives verified; a zoo blob
larger than two resets' worth arrives and reads back intact only because the client
resumes (and shrinks its chunks below what one connection carries)."""

from __future__ import annotations

import os
import time

import pytest
from netem import Netem

from pnc_cli.daemons import spawn_daemon, stop_daemon
from pnc_net import wire
from pnc_net.fsutil import sha256_bytes
from pnc_net.serve.client import PncClient

pytestmark = [pytest.mark.grpc, pytest.mark.slow]
TOKEN = "lossy-link-token"
RESET_EVERY = 256 << 10
BLOB_BYTES = 640 << 10  # > 2 resets' worth each way, ~5 s at 1 Mbit/s


@pytest.fixture(scope="module")
def receiver(tmp_path_factory, zoo_dir):
    """A receiver in its own process; its port."""
    store = tmp_path_factory.mktemp("lossy-store")
    proc, port = spawn_daemon("receiver", ["--listen", "127.0.0.1:0", "--zoo", str(zoo_dir),
                                           "--store", str(store), "--token", TOKEN])
    yield port
    stop_daemon(proc)


def lossy(port: int) -> Netem:
    return Netem(port, delay_s=0.2, rate_bps=1e6, reset_every=RESET_EVERY, lifetime_s=120)


def test_package_arrives_verified(receiver, default_clone):
    data = wire.encode(default_clone.package)
    with lossy(receiver) as link, PncClient(link.address, TOKEN) as c:
        t = time.monotonic()
        pid, sent = c.send_package(data)
        took = time.monotonic() - t
        assert pid == sha256_bytes(data) and sent == len(data)
        assert c.last_write.state == "verified", c.last_write.detail
    print(f"package {len(data)} B through the lossy link: {took:.2f} s, {link.stats()}")
    assert took >= 0.4  # the link's delay was really there (at least one round trip)


def test_blob_survives_resets_both_ways(receiver):
    data = os.urandom(BLOB_BYTES)
    sha = sha256_bytes(data)
    with lossy(receiver) as link, PncClient(link.address, TOKEN, timeout_s=20) as c:
        t = time.monotonic()
        sent = c.write_blob("blobs", data)
        up_s, up_resets = time.monotonic() - t, link.resets
        assert sent >= len(data)
        assert up_resets >= 2, link.stats()
        t = time.monotonic()
        got = c.read_blob("blobs", sha, len(data))  # digest verified inside
        down_s = time.monotonic() - t
    assert got == data
    stats = link.stats()
    print(f"blob {len(data)} B: write {up_s:.1f} s ({up_resets} resets, {sent} B sent), "
          f"read {down_s:.1f} s ({stats['resets'] - up_resets} resets); {stats}")
    assert stats["resets"] - up_resets >= 2, stats
    assert stats["bytes_up"] >= len(data) and stats["bytes_down"] >= len(data)


def test_retry_counts_only_attempts_without_progress():
    """Failures that moved the count do not use up the budget; a stuck run still fails."""
    from pnc_net.serve.retry import retry

    done, calls = [0], [0]

    def moving() -> str:  # fails 9 times, each after one more unit of work
        calls[0] += 1
        if calls[0] < 10:
            done[0] += 1
            raise TimeoutError("link broke")
        return "ok"

    assert retry(moving, attempts=2, retryable=lambda e: True, sleep=lambda s: None,
                 progress=lambda: done[0]) == "ok"
    stuck = [0]

    def never() -> None:
        stuck[0] += 1
        raise TimeoutError("stuck")

    with pytest.raises(TimeoutError):
        retry(never, attempts=3, retryable=lambda e: True, sleep=lambda s: None,
              progress=lambda: 0)
    assert stuck[0] == 3

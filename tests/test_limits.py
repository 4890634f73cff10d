"""Receivers that cannot be knocked over: stream limits, deadlines, roles, hostile inputs.

Real daemons in their own processes on 127.0.0.1 (issue 13): each attack is refused
with a proper status, the daemon keeps serving, and nothing is stored.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from pnc_cli.daemons import spawn_daemon, stop_daemon
from pnc_net import wire
from pnc_net._proto import transport_pb2 as tpb
from pnc_net.errors import InvalidInputError, PermissionDeniedError, UnauthenticatedError
from pnc_net.fsutil import sha256_bytes
from pnc_net.serve.client import PncClient

pytestmark = pytest.mark.grpc
PUBLISHER, READER = "pub-token", "read-token"


@pytest.fixture(scope="module")
def receiver(tmp_path_factory, zoo_dir):
    """A receiver with a publisher and a reader token, small upload limits, and an old
    partial upload left in its store before it starts."""
    store = tmp_path_factory.mktemp("limits-store")
    stale = store / "uploads" / f"blobs-{'a' * 64}-10.part"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"x" * 5)
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    proc, port = spawn_daemon("receiver", [
        "--listen", "127.0.0.1:0", "--zoo", str(zoo_dir), "--store", str(store),
        "--token", PUBLISHER, "--read-token", READER, "--max-workers", "8",
        "--max-uploads", "4", "--max-streams-per-caller", "2", "--upload-idle", "2",
        "--part-ttl", "3600"])
    yield f"127.0.0.1:{port}", store, proc, stale
    stop_daemon(proc)


def _stalled_write(addr: str, release: threading.Event, codes: list) -> None:
    """Open a Write stream and send nothing until ``release``; record how it ended."""
    def requests():
        release.wait(60)
        return
        yield  # a generator that yields nothing

    with PncClient(addr, PUBLISHER) as c:
        try:
            c.bytestream.Write(requests(), timeout=60, metadata=c.metadata)
            codes.append("OK")
        except grpc.RpcError as err:
            codes.append(err.code().name)


def test_stalled_streams_do_not_starve_health_or_list(receiver):
    addr, _, proc, _ = receiver
    release, codes = threading.Event(), []
    threads = [threading.Thread(target=_stalled_write, args=(addr, release, codes))
               for _ in range(12)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        with PncClient(addr, READER, timeout_s=5) as c:
            assert c.health() == "SERVING"
            assert c.list() == []
        # beyond two streams of this caller, each Write is refused at once
        deadline = time.monotonic() + 10
        while codes.count("RESOURCE_EXHAUSTED") < 10 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert codes.count("RESOURCE_EXHAUSTED") == 10
        # the two admitted streams send nothing: the idle deadline (2 s) cancels them
        deadline = time.monotonic() + 15
        while len(codes) < 12 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(codes) == 12 and "OK" not in codes
    finally:
        release.set()
        for t in threads:
            t.join(30)
    assert proc.poll() is None


def test_stale_partial_uploads_are_removed(receiver):
    assert not receiver[3].exists()


def test_a_reader_may_read_but_not_write(receiver, default_clone):
    addr, store, _, _ = receiver
    data = wire.encode(default_clone.package)
    with PncClient(addr, READER, max_attempts=1) as c:
        assert c.capabilities().auth_required
        with pytest.raises(PermissionDeniedError, match="only read"):
            c.send_package(data)
    assert list((store / "packages").glob("*.pnc")) == []
    with PncClient(addr, "wrong", max_attempts=1) as c, pytest.raises(UnauthenticatedError):
        c.list()
    with PncClient(addr, PUBLISHER) as c:
        pid, _ = c.send_package(data)
        assert c.last_write.state == "verified"
    with PncClient(addr, READER) as reader:
        assert [p.id for p in reader.list()] == [pid]
        assert len(reader.predict(pid[:12], np.zeros((2, 1, 28, 28), np.float32)).predictions) == 2


def test_huge_inputs_are_refused_not_labelled(receiver, default_clone):
    addr = receiver[0]
    with PncClient(addr, PUBLISHER) as c:
        pid, _ = c.send_package(wire.encode(default_clone.package))
        x = np.full((2, 1, 28, 28), 1e38, np.float32)
        x[1] = -1e38
        # The energy veto shuts the gate on such inputs, so the target may answer alone;
        # what must never happen is a NaN or infinite output dressed up as a label.
        try:
            resp = c.predict(pid, x)
        except InvalidInputError as err:
            assert "NaN or infinite" in str(err)
        else:
            assert len(resp.predictions) == 2
            for pred in resp.predictions:
                probs = np.array(pred.probabilities)
                assert np.isfinite(probs).all() and abs(probs.sum() - 1) < 1e-4, probs
                assert pred.label == resp.label_names[int(probs.argmax())]
        assert c.health() == "SERVING"


@pytest.mark.parametrize("name", [f"blobs/{'b' * 64}/1\u00b2", f"blobs/{'b' * 64}/\u0661\u0662",
                                  f"blobs/{'b' * 64}/" + "9" * 30])
def test_odd_resource_sizes_are_invalid_argument(receiver, name):
    with PncClient(receiver[0], PUBLISHER) as c, pytest.raises(grpc.RpcError) as info:
        c.bytestream.QueryWriteStatus(tpb.QueryWriteStatusRequest(resource_name=name),
                                      timeout=10, metadata=c.metadata)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_loose_fingerprint_tolerance_does_not_verify_garbage(receiver, default_clone):
    import copy

    bad = copy.deepcopy(default_clone.package)
    fp = bad.fingerprint
    bad.fingerprint = type(fp)(fp.probe_seed, fp.probe_count, fp.probabilities.flip(1), 1.0)
    data = wire.encode(bad)
    with PncClient(receiver[0], PUBLISHER) as c:
        c.send_package(data)
        assert c.last_write.state == "failed"
        assert "tolerance 0.05" in c.stat(sha256_bytes(data)).detail


def test_the_announced_address_is_the_bound_one(tmp_path):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "sender", "--listen", "127.0.0.2:0",
                             "--store", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("pnc sender listening on 127.0.0.2:"), line
        port = int(line.rsplit("port=", 1)[1])
        with PncClient(f"127.0.0.2:{port}") as c:
            assert c.health() == "SERVING"
    finally:
        stop_daemon(proc)


def test_bad_limits_are_one_line_errors(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "receiver", "--listen", "127.0.0.1:0", "--zoo",
                        str(tmp_path), "--store", str(tmp_path / "s"), "--max-uploads", "64"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and "--max-uploads" in r.stderr and "Traceback" not in r.stderr
    assert not Path(tmp_path / "s").exists()

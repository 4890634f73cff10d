"""Real daemons in their own processes on 127.0.0.1: the happy path and every fault
issue 3 names. Each fault must give a clear status, store nothing, and leave the
daemon serving."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import zstandard

from pnc_cli.daemons import spawn_daemon, stop_daemon
from pnc_net import wire
from pnc_net._proto import transport_pb2 as tpb
from pnc_net.errors import InvalidInputError, PncError, PreconditionError
from pnc_net.fsutil import sha256_bytes
from pnc_net.serve.client import CHUNK_BYTES, PncClient

pytestmark = pytest.mark.grpc
TOKEN = "s3cret-token"




@pytest.fixture(scope="module")
def pkg_bytes(default_clone) -> bytes:
    return wire.encode(default_clone.package)


@pytest.fixture(scope="module")
def receiver(tmp_path_factory, zoo_dir):
    """One receiver (token required) for the fault tests, with its store folder."""
    store = tmp_path_factory.mktemp("recv-store")
    proc, port = spawn_daemon("receiver", ["--listen", "127.0.0.1:0", "--zoo", str(zoo_dir),
                                           "--store", str(store), "--token", TOKEN])
    yield f"127.0.0.1:{port}", store, proc
    stop_daemon(proc)


def visible(store: Path) -> list[str]:
    return sorted(p.name for p in (store / "packages").glob("*.pnc"))


def assert_untouched(receiver, before: list[str]) -> None:
    addr, store, proc = receiver
    assert visible(store) == before, "a refused input left a package behind"
    assert proc.poll() is None, "the daemon died"
    with PncClient(addr, TOKEN) as c:
        assert c.health() == "SERVING"
        assert len(c.list()) == len(before)


def write_raw(addr: str, data: bytes, sha: str | None = None, kind: str = "packages"):
    with PncClient(addr, TOKEN, max_attempts=1) as c:
        name = f"{kind}/{sha or sha256_bytes(data)}/{len(data)}"
        return c.bytestream.Write(iter([tpb.WriteRequest(resource_name=name, data=data,
                                                         finish_write=True)]),
                                  timeout=30, metadata=c.metadata)


# ----------------------------------------------------------------------------- happy path


def test_send_verify_predict_fetch(receiver, pkg_bytes, mnist, tmp_path):
    addr, store, _ = receiver
    with PncClient(addr, TOKEN) as c:
        pid, sent = c.send_package(pkg_bytes)
        assert pid == sha256_bytes(pkg_bytes) and sent == len(pkg_bytes)
        assert c.last_write.state == "verified", c.last_write.detail
        info = c.stat(pid[:8])
        assert info.state == "verified" and info.fingerprint_error <= 0.02
        x = mnist.x_test[:32]
        resp = c.predict(pid[:10], x)
        assert [p.label for p in resp.predictions] and len(resp.predictions) == 32
        assert c.fetch_package(pid[:6]) == pkg_bytes
        pid2, sent2 = c.send_package(pkg_bytes)  # already held: nothing re-sent
        assert pid2 == pid and sent2 == 0
    assert visible(store) == [f"{pid}.pnc"]
    out = tmp_path / "f.pnc"
    cli = [sys.executable, "-c", "import pnc_cli; pnc_cli.main()"]
    env = {**os.environ, "PNC_TOKEN": TOKEN}
    r = subprocess.run([*cli, "fetch", pid[:8], "--from", addr, "--out", str(out), "--json"],
                       capture_output=True, text=True, env=env, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert sha256_bytes(out.read_bytes()) == pid
    r = subprocess.run([*cli, "status", "--from", addr, "--json"], capture_output=True,
                       text=True, env=env, timeout=60, check=False)
    assert r.returncode == 0 and '"verified"' in r.stdout and '"SERVING"' in r.stdout
    from PIL import Image

    png, npy = tmp_path / "digit.png", tmp_path / "digits.npy"
    Image.fromarray((x[0, 0].numpy() * 255).round().astype("uint8")).save(png)
    np.save(npy, x[1:3, 0].numpy())
    r = subprocess.run([*cli, "predict", "--from", addr, "--package", pid[:8], str(png), str(npy),
                        "--json"], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    got = [p["label"] for p in json.loads(r.stdout)["predictions"]]
    assert got == [p.label for p in resp.predictions[:3]]


# ----------------------------------------------------------------------------- faults


def _bad_packages(pkg) -> dict[str, tuple[bytes, type, str]]:
    data = wire.encode(pkg)
    msg = wire.to_proto(pkg)
    msg.format_version = 7
    future = zstandard.ZstdCompressor(level=3).compress(msg.SerializeToString())
    corrupt = bytearray(data)
    corrupt[len(corrupt) // 2] ^= 0xFF
    unknown = copy.deepcopy(pkg)
    unknown.modules[0].source = type(pkg.target)("mnist-cnn-ghost", "e" * 64, 1234, "cnn")
    widths = copy.deepcopy(pkg)
    layer = min(widths.modules[0].masks)
    widths.modules[0].masks[layer] = torch.ones(widths.modules[0].masks[layer].numel() + 3,
                                                dtype=torch.bool)
    return {
        "truncated": (data[: len(data) // 2], InvalidInputError, "truncated|zstd"),
        "corrupted": (bytes(corrupt), InvalidInputError, "package|zstd"),
        "unknown format version": (future, InvalidInputError, "format version 7"),
        "unknown zoo reference": (wire.encode(unknown), PreconditionError,
                                  "mnist-cnn-ghost.*no mirror"),
        "mask widths": (wire.encode(widths), InvalidInputError, "width"),
    }


@pytest.mark.parametrize("case", ["truncated", "corrupted", "unknown format version",
                                  "unknown zoo reference", "mask widths"])
def test_bad_packages_are_refused(receiver, default_clone, case):
    data, err, needle = _bad_packages(default_clone.package)[case]
    before = visible(receiver[1])
    with PncClient(receiver[0], TOKEN) as c, pytest.raises(err, match=needle):
        c.write_blob("packages", data)
    assert_untouched(receiver, before)


def test_digest_mismatch_stores_nothing(receiver, pkg_bytes):
    before = visible(receiver[1])
    with pytest.raises(grpc.RpcError) as info:
        write_raw(receiver[0], pkg_bytes, sha="0" * 64)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "digest mismatch" in info.value.details()
    assert_untouched(receiver, before)
    assert not list((receiver[1] / "uploads").glob("*0000000000*"))


def test_oversized_message(receiver):
    """A client configured to send 5 MiB messages meets the server's explicit 4 MiB limit."""
    from pnc_net._proto import transport_pb2_grpc as tgrpc

    before = visible(receiver[1])
    data = os.urandom(5 << 20)
    name = f"blobs/{sha256_bytes(data)}/{len(data)}"
    opts = [("grpc.max_send_message_length", 16 << 20)]
    with grpc.insecure_channel(receiver[0], options=opts) as ch, \
            pytest.raises(grpc.RpcError) as info:
        tgrpc.ByteStreamStub(ch).Write(
            iter([tpb.WriteRequest(resource_name=name, data=data, finish_write=True)]),
            timeout=30, metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_untouched(receiver, before)
    with PncClient(receiver[0], TOKEN) as c:  # and our own client refuses to send one
        with pytest.raises(grpc.RpcError) as info:
            c.bytestream.Write(iter([tpb.WriteRequest(resource_name=name, data=data)]),
                               timeout=30, metadata=c.metadata)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("token", [None, "wrong"])
def test_missing_or_wrong_token(receiver, pkg_bytes, token):
    before = visible(receiver[1])
    with PncClient(receiver[0], token, max_attempts=1) as c:
        with pytest.raises(PncError, match="UNAUTHENTICATED") as info:
            c.list()
        assert info.value.exit_code == 8
        with pytest.raises(PncError, match="UNAUTHENTICATED"):
            c.write_blob("packages", pkg_bytes)
        assert c.health() == "SERVING"  # health checks stay open for load balancers
    assert_untouched(receiver, before)


@pytest.mark.parametrize("call", ["stat", "read", "query", "manifest"])
def test_ids_that_look_like_paths(receiver, call):
    before = visible(receiver[1])
    with (PncClient(receiver[0], TOKEN, max_attempts=1) as c,
          pytest.raises(InvalidInputError, match="not a sha256|not packages|resource")):
        if call == "stat":
            c.stat("../x")
        elif call == "read":
            c.read_blob("packages", "../../etc/passwd")
        elif call == "query":
            c._call(c.bytestream.QueryWriteStatus,
                    tpb.QueryWriteStatusRequest(resource_name="packages/../../x/5"))
        else:
            c.zoo_manifest("../models/x")
    assert_untouched(receiver, before)


def test_client_disconnects_mid_stream_then_resumes(receiver):
    addr, store, _ = receiver
    blob = os.urandom(6 * CHUNK_BYTES + 123)
    sha, size = sha256_bytes(blob), len(blob)
    name = f"blobs/{sha}/{size}"

    def two_chunks_then_hang():
        for i in range(2):
            yield tpb.WriteRequest(resource_name=name if i == 0 else "", write_offset=i *
                                   CHUNK_BYTES, data=blob[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES])
        time.sleep(30)

    with PncClient(addr, TOKEN) as c:
        future = c.bytestream.Write.future(two_chunks_then_hang(), timeout=30, metadata=c.metadata)
        committed = 0
        for _ in range(100):
            committed = c.bytestream.QueryWriteStatus(
                tpb.QueryWriteStatusRequest(resource_name=name), metadata=c.metadata,
                timeout=5).committed_size
            if committed == 2 * CHUNK_BYTES:
                break
            time.sleep(0.1)
        future.cancel()  # the client goes away mid-stream
        assert committed == 2 * CHUNK_BYTES
        assert not (store / "blobs" / sha).exists()  # nothing visible yet
        assert c.health() == "SERVING"
        sent = c.write_blob("blobs", blob)  # resumes from the committed offset
        assert sent == size - 2 * CHUNK_BYTES
        assert c.read_blob("blobs", sha, size) == blob
    assert sha256_bytes((store / "blobs" / sha).read_bytes()) == sha


@pytest.mark.slow
def test_receiver_killed_mid_transfer_resumes(tmp_path, zoo_dir, pkg_bytes):
    """SIGKILL during a blob upload; a restarted receiver on the same store continues from
    the committed offset (re-sending at most one chunk) and still holds its packages."""
    store = tmp_path / "store"
    args = ["--listen", "127.0.0.1:0", "--zoo", str(zoo_dir), "--store", str(store)]
    proc, port = spawn_daemon("receiver", args)
    blob = os.urandom(14 * CHUNK_BYTES + 7)
    sha = sha256_bytes(blob)
    part = store / "uploads" / f"blobs-{sha}-{len(blob)}.part"
    yielded = []

    def kill_mid_stream(end: int) -> None:  # runs as the client hands over each chunk
        if end >= 7 * CHUNK_BYTES and proc.poll() is None:
            for _ in range(200):
                if part.exists() and part.stat().st_size >= 5 * CHUNK_BYTES:
                    break
                time.sleep(0.05)
            yielded.append(end - CHUNK_BYTES)  # bytes handed to gRPC before this chunk
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)

    try:
        with PncClient(f"127.0.0.1:{port}") as c:
            pid, _ = c.send_package(pkg_bytes)
        with (PncClient(f"127.0.0.1:{port}", max_attempts=1) as c,
              pytest.raises(PncError, match="UNAVAILABLE|CANCELLED|INTERNAL|UNKNOWN")):
            c.write_blob("blobs", blob, kill_mid_stream)
    finally:
        stop_daemon(proc)
    committed = part.stat().st_size
    assert not (store / "blobs" / sha).exists()  # a half blob is never visible
    assert 0 <= yielded[0] - committed <= CHUNK_BYTES  # at most one chunk is sent again
    proc, port = spawn_daemon("receiver", args)
    try:
        with PncClient(f"127.0.0.1:{port}") as c:
            assert c.stat(pid).state == "verified"  # the package survived the crash
            sent = c.write_blob("blobs", blob)
            assert sent == len(blob) - committed
            assert c.read_blob("blobs", sha) == blob
    finally:
        stop_daemon(proc)

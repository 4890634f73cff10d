"""The fast blob path (issue 11 item 5) keeps every safety property: hand-framed messages
parse as protobuf would, a chunked write whose digest is wrong leaves nothing, a resumed
write is verified whole, and a reader never holds more than the size it asked for."""

from __future__ import annotations

import hashlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pnc_net._proto import transport_pb2 as tpb
from pnc_net.errors import IntegrityError, InvalidInputError, PncError
from pnc_net.fsutil import Sha256Stream, sha256_bytes
from pnc_net.serve import client as client_mod
from pnc_net.serve import store as store_mod
from pnc_net.serve.client import CHUNK_BYTES, PncClient, _chunks
from pnc_net.serve.framing import (
    frame_read_response,
    frame_write_request,
    parse_write_request,
    read_payload,
)
from pnc_net.serve.node import Node
from pnc_net.serve.server import build_server
from pnc_net.serve.store import PackageStore

SIZES = (0, 1, 127, 128, 300, 16383, 16384, 2097151, 2097152)


@pytest.mark.parametrize("n", SIZES)
def test_read_payload_is_what_protobuf_parses(n):
    data = os.urandom(n)
    raw = tpb.ReadResponse(data=data).SerializeToString()
    holder, at = read_payload(raw)
    assert holder[at:] == data and (holder is raw or not data)


@pytest.mark.parametrize("n", SIZES)
def test_framed_read_response_is_protobufs_encoding(n):
    data = os.urandom(n)
    raw = frame_read_response(data)
    assert raw == tpb.ReadResponse(data=data).SerializeToString()
    assert tpb.ReadResponse.FromString(raw).data == data


def test_read_payload_falls_back_to_protobuf_for_other_encodings():
    a, b = os.urandom(50), os.urandom(70)
    repeated = (tpb.ReadResponse(data=a).SerializeToString()
                + tpb.ReadResponse(data=b).SerializeToString())  # the last one wins
    holder, at = read_payload(repeated)
    assert holder[at:] == b == tpb.ReadResponse.FromString(repeated).data
    unknown = tpb.ReadResponse(data=a).SerializeToString() + bytes([2 << 3 | 0, 5])
    holder, at = read_payload(unknown)
    assert holder[at:] == a
    truncated = tpb.ReadResponse(data=a).SerializeToString()[:-1]
    with pytest.raises(Exception):  # noqa: B017 - protobuf's DecodeError
        read_payload(truncated)


@pytest.mark.parametrize("n", SIZES)
def test_write_request_is_the_protobuf_message(n):
    piece = os.urandom(n)
    raw = frame_write_request("blobs/x/1", 12345678901, n % 2 == 1, memoryview(piece))
    req = tpb.WriteRequest.FromString(raw)
    assert (req.resource_name, req.write_offset, req.finish_write, req.data) == (
        "blobs/x/1", 12345678901, n % 2 == 1, piece)


def _as_protobuf_reads(raw: bytes) -> tuple:
    req = tpb.WriteRequest.FromString(raw)
    return req.resource_name, req.write_offset, req.finish_write, req.data


def _parsed(raw: bytes) -> tuple:
    chunk = parse_write_request(raw)
    return chunk.resource_name, chunk.write_offset, chunk.finish_write, bytes(chunk.data)


@pytest.mark.parametrize("n", SIZES)
def test_parse_write_request_reads_what_protobuf_reads_without_a_copy(n):
    piece = os.urandom(n)
    for raw in (frame_write_request("blobs/x/1", 7 * n, n % 2 == 0, memoryview(piece)),
                tpb.WriteRequest(resource_name="b", write_offset=n, data=piece).SerializeToString()):
        assert _parsed(raw) == _as_protobuf_reads(raw)
        if n:  # the data is a view of the message itself, not a copy
            assert parse_write_request(raw).data.obj is raw


def test_parse_write_request_falls_back_to_protobuf_for_other_encodings():
    a, b = os.urandom(50), os.urandom(70)
    repeated = frame_write_request("n", 1, False, memoryview(a)) + \
        tpb.WriteRequest(data=b).SerializeToString()  # the last data wins
    data_first = tpb.WriteRequest(data=a).SerializeToString() + \
        tpb.WriteRequest(resource_name="late", write_offset=9).SerializeToString()
    unknown_after = frame_write_request("n", 1, True, memoryview(a)) + bytes([9 << 3 | 0, 5])
    for raw in (repeated, data_first, unknown_after, b""):
        assert _parsed(raw) == _as_protobuf_reads(raw)
    assert _parsed(repeated)[3] == b and _parsed(data_first)[:2] == ("late", 9)


def test_parse_write_request_refuses_malformed_messages():
    good = frame_write_request("blobs/x/1", 5, False, memoryview(os.urandom(300)))
    for bad in (good[:-1], good + bytes([0x22]), bytes([0x22, 0xFF]), bytes([0x80] * 11)):
        with pytest.raises(InvalidInputError, match="malformed WriteRequest"):
            parse_write_request(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_parse_write_request_agrees_with_protobuf_on_any_bytes(raw):
    try:
        expected = _as_protobuf_reads(raw)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError
        with pytest.raises(InvalidInputError):
            parse_write_request(raw)
        return
    assert _parsed(raw) == expected


def test_chunks_cover_the_data_once_from_the_offset():
    data = os.urandom(3 * 1000 + 17)
    counter = [0]
    reqs = [tpb.WriteRequest.FromString(r)
            for r in _chunks("blobs/n/3017", data, 1000, counter, chunk_bytes=1000)]
    assert [r.write_offset for r in reqs] == [1000, 2000, 3000]
    assert reqs[0].resource_name == "blobs/n/3017" and not reqs[1].resource_name
    assert [r.finish_write for r in reqs] == [False, False, True]
    assert b"".join(r.data for r in reqs) == data[1000:] and counter[0] == len(data) - 1000
    [done] = [tpb.WriteRequest.FromString(r) for r in _chunks("n", data, len(data), [0])]
    assert done.finish_write and not done.data


@pytest.mark.parametrize("n_pieces", [1, 3, 40])
def test_hasher_matches_hashlib_inline_and_threaded(n_pieces):
    pieces = [os.urandom(300_001) for _ in range(n_pieces)]
    h = Sha256Stream(inline_bytes=600_000, max_pending=2)  # a short queue: update blocks
    for p in pieces:
        h.update(memoryview(p))
    assert h.hexdigest() == hashlib.sha256(b"".join(pieces)).hexdigest()
    assert (h._queue is not None) == (n_pieces > 2)  # the thread only past inline_bytes


@pytest.fixture()
def small_writeback(monkeypatch):
    monkeypatch.setattr(store_mod, "WRITEBACK_BYTES", 64 << 10)  # many writeback requests


def test_chunked_write_with_a_wrong_digest_leaves_nothing(tmp_path, small_writeback):
    store = PackageStore(tmp_path / "s")
    blob = os.urandom(1 << 20)
    wrong = sha256_bytes(blob[::-1])
    up = store.upload("blobs", wrong, len(blob))
    up.open(0)
    for i in range(0, len(blob), 100_000):
        up.append(blob[i: i + 100_000])
    with pytest.raises(InvalidInputError, match="digest mismatch"):
        up.finish()
    assert not list(store.uploads_dir.iterdir()) and not list(store.blobs_dir.iterdir())


def test_resumed_write_is_verified_whole(tmp_path, small_writeback):
    store = PackageStore(tmp_path / "s")
    blob = os.urandom(700_000)
    sha = sha256_bytes(blob)
    first = store.upload("blobs", sha, len(blob))
    first.open(0)
    assert first.append(blob[:300_000]) == 300_000
    first.close()  # the stream broke; the part stays
    part = first.path
    assert part.stat().st_size == 300_000
    again = store.upload("blobs", sha, len(blob))
    with pytest.raises(InvalidInputError, match="committed size 300000"):
        again.open(1000)
    again.open(300_000)
    again.append(blob[300_000:])
    done = again.finish()
    assert done.read_bytes() == blob
    done.unlink()  # what the servicer's commit does (by renaming it into blobs/)
    # the same resume over a part that rotted on disk is caught by the digest
    bad = store.upload("blobs", sha, len(blob))
    bad.open(0)
    bad.append(blob[:300_000])
    bad.close()
    raw = bytearray(part.read_bytes())
    raw[5] ^= 1
    part.write_bytes(bytes(raw))
    bad = store.upload("blobs", sha, len(blob))
    bad.open(300_000)
    bad.append(blob[300_000:])
    with pytest.raises(InvalidInputError, match="digest mismatch"):
        bad.finish()
    assert not part.exists()


def test_upload_refuses_bytes_past_the_declared_size(tmp_path):
    store = PackageStore(tmp_path / "s")
    up = store.upload("blobs", "a" * 64, 10)
    up.open(0)
    up.append(b"12345")
    with pytest.raises(InvalidInputError, match="past the declared size"):
        up.append(b"123456")
    assert up.committed_size() == 5
    up.discard()


@pytest.fixture()
def mirror(tmp_path):
    daemon = build_server(Node("sender", PackageStore(tmp_path / "m"), None), "127.0.0.1:0")
    try:
        yield daemon
    finally:
        daemon.stop(0)


def test_large_blob_both_ways_digest_verified(mirror):
    blob = os.urandom(6 * CHUNK_BYTES + 12345)  # past the inline hashing: the thread runs
    sha = sha256_bytes(blob)
    with PncClient(f"127.0.0.1:{mirror.port}", timeout_s=30) as c:
        assert c.write_blob("blobs", blob, max_unacked=None, sha256=sha) == len(blob)
        got = c.read_blob("blobs", sha, len(blob))
        assert type(got) is bytes and got == blob
        assert c.read_blob("blobs", sha) == blob  # size unknown: bounded by MAX_BLOB_BYTES
    stored = mirror.servicer.node.store.blob_path(sha)
    assert stored.read_bytes() == blob and not list(stored.parent.parent.glob("uploads/*"))


def test_write_with_a_wrong_known_digest_stores_nothing(mirror):
    blob = os.urandom(3 * CHUNK_BYTES)
    claimed = sha256_bytes(b"something else")
    with (PncClient(f"127.0.0.1:{mirror.port}", timeout_s=30, max_attempts=1) as c,
          pytest.raises(PncError, match="digest mismatch")):
        c.write_blob("blobs", blob, max_unacked=None, sha256=claimed)
    store = mirror.servicer.node.store
    assert not store.has("blobs", claimed) and not list(store.uploads_dir.iterdir())


def test_reader_refuses_more_than_the_size_it_asked_for(mirror):
    blob = os.urandom(2 * CHUNK_BYTES + 5)
    sha = sha256_bytes(blob)
    with PncClient(f"127.0.0.1:{mirror.port}", timeout_s=30) as c:
        c.write_blob("blobs", blob)
        with pytest.raises(IntegrityError, match="runs past its size"):
            c.read_blob("blobs", sha, CHUNK_BYTES + 1)


@pytest.mark.parametrize("size", [None, 10, client_mod.ASSEMBLE_MIN_BYTES + 3])
def test_assembly_builds_the_blob_in_place_or_by_joining(size):
    n = size or 3000
    data = os.urandom(n)
    asm = client_mod._Assembly(size)
    assert (asm._target is not None) == (size is not None and size > 10)
    for i in range(0, n, 1000):  # each piece behind a 5-byte header, as a message has it
        asm.add(b"hdr!!" + data[i: i + 1000], 5)
    got = asm.result()
    assert type(got) is bytes and got == data
    if asm._target is not None:
        with pytest.raises(IntegrityError):
            asm.add(b"x", 0)  # never past the size it was made for
        half = client_mod._Assembly(size)
        half.add(data[:100], 0)
        assert half.result() == data[:100]

"""ByteStream messages framed and parsed by hand, so blob bytes are never copied by protobuf.

A 1 MiB chunk that goes through protobuf is copied on every step: into the message
when it is built or parsed, and again on each access of its ``data`` field. On this
kind of machine a copy into freshly faulted memory costs as much as hashing the
bytes, so the blob path frames and parses its own messages:

* the client frames each ``WriteRequest`` (``frame_write_request``): protobuf's
  encoding of the small fields, then the data field appended (one copy);
* the server takes each ``WriteRequest`` as the serialized message and finds its data
  inside it (``parse_write_request``): a view, no copy;
* the client finds the data of each ``ReadResponse`` the same way (``read_payload``).

Each parser handles the exact encoding pnc peers send and falls back to protobuf's own
parser for anything else, so every valid message means what protobuf says it means
(tests/test_blob_speed.py checks both against protobuf). A malformed message is an
``InvalidInputError``, never a crash.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from pnc_net._proto import transport_pb2 as tpb
from pnc_net.errors import InvalidInputError

_DATA_TAG = bytes([4 << 3 | 2])  # WriteRequest.data: field 4, length-delimited
_READ_DATA_TAG = bytes([1 << 3 | 2])  # ReadResponse.data: field 1, length-delimited
_DATA_FIELD, _LENGTH_DELIMITED = 4, 2


def varint(n: int) -> bytes:
    """Protobuf's base-128 varint encoding of ``n`` >= 0."""
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(raw: bytes | memoryview, i: int) -> tuple[int, int]:
    """The varint at ``raw[i]`` and the position after it; ``ValueError`` if truncated or
    longer than 10 bytes (what protobuf allows)."""
    n, shift = 0, 0
    for j in range(i, min(len(raw), i + 10)):
        b = raw[j]
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, j + 1
        shift += 7
    raise ValueError("bad varint")


def frame_write_request(name: str, offset: int, finish: bool, piece: memoryview) -> bytes:
    """A serialized ``WriteRequest``: protobuf's encoding of the small fields, then the
    data field appended (concatenated encodings are one message), ``piece`` copied once."""
    head = tpb.WriteRequest(resource_name=name, write_offset=offset,
                            finish_write=finish).SerializeToString()
    if not len(piece):
        return head
    return b"".join((head, _DATA_TAG, varint(len(piece)), piece))


@dataclass(frozen=True)
class WriteChunk:
    """One parsed ``WriteRequest``; ``data`` is a view into the received message."""

    resource_name: str
    write_offset: int
    finish_write: bool
    data: memoryview


def parse_write_request(raw: bytes) -> WriteChunk:
    """A serialized ``WriteRequest`` whose data is found without copying it.

    When the message's last field is the data field (how ``frame_write_request`` and
    protobuf itself write it), the fields before it are parsed by protobuf and the data
    is a view of ``raw``; for a scalar field the last occurrence wins, so this is what
    protobuf would read. Anything else is parsed by protobuf whole.

    Raises:
        InvalidInputError: ``raw`` is not a valid ``WriteRequest``.
    """
    try:
        start = _last_data_field(raw)
        if start is None:
            req = tpb.WriteRequest.FromString(raw)
            data = memoryview(req.data)
        else:
            head_end, data_start = start
            req = tpb.WriteRequest.FromString(raw[:head_end])
            data = memoryview(raw)[data_start:]
    except DecodeError:
        raise InvalidInputError("malformed WriteRequest: it does not parse as protobuf; "
                                "send ByteStream.Write messages of pnc's protocol") from None
    return WriteChunk(req.resource_name, req.write_offset, req.finish_write, data)


def _last_data_field(raw: bytes) -> tuple[int, int] | None:
    """``(field start, data start)`` when the last top-level field of ``raw`` is the
    data field and ends exactly at the end of ``raw``; None otherwise (protobuf then
    parses the whole message and judges it)."""
    i, last = 0, None
    try:
        while i < len(raw):
            field_start = i
            key, i = _read_varint(raw, i)
            wire = key & 7
            if wire == 0:
                _, i = _read_varint(raw, i)
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            elif wire == _LENGTH_DELIMITED:
                n, i = _read_varint(raw, i)
                if key >> 3 == _DATA_FIELD and i + n == len(raw):
                    last = (field_start, i)
                i += n
            else:
                return None  # groups: protobuf's business
    except ValueError:
        return None
    return last if i == len(raw) else None


def frame_read_response(data: bytes) -> bytes:
    """A serialized ``ReadResponse`` carrying ``data``: the very bytes protobuf writes
    (field 1, its length, the data; nothing for empty data), made by one join.

    The server's Read sends these (``server.add_bytestream``): protobuf's own
    ``SerializeToString`` ran at about 470 MB/s on a 1 MiB message here, which was the
    pace of the whole Read (the join: about 45 GB/s)."""
    if not data:
        return b""
    return b"".join((_READ_DATA_TAG, varint(len(data)), data))


def read_payload(raw: bytes) -> tuple[bytes, int]:
    """Where the data of a serialized ``ReadResponse`` is: ``(holder, start)``, the data
    being ``holder[start:]``, found without copying it.

    A pnc server's answer is exactly field 1 (tag ``0x0a``, a varint length, the bytes):
    then ``holder`` is ``raw``. Anything else (empty, other or repeated fields) goes
    through protobuf's parser and ``holder`` is the data it returns."""
    if len(raw) > 1 and raw[0] == 0x0A:
        try:
            n, i = _read_varint(raw, 1)
        except ValueError:
            n, i = -1, 0
        if i + n == len(raw):
            return raw, i
    return tpb.ReadResponse.FromString(raw).data, 0

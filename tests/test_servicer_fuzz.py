"""Fuzz of a real receiver's gRPC services: random and mutated requests never give INTERNAL.

Each request message is drawn field by field from its protobuf descriptor, with strings
from a pool that mixes valid pieces (a stored package's id and resource names) with
hostile ones (paths, unicode digits, huge numbers). Whatever a peer sends, the answer is a
proper status (INVALID_ARGUMENT, NOT_FOUND, ...) and the daemon keeps serving.
"""

from __future__ import annotations

import os

import pytest
from google.protobuf.descriptor import FieldDescriptor as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pnc_cli.daemons import spawn_daemon, stop_daemon
from pnc_net import wire
from pnc_net._proto import transport_pb2 as tpb
from pnc_net.serve.client import PncClient

pytestmark = [pytest.mark.grpc, pytest.mark.slow]
BAD_CODES = {"INTERNAL", "UNKNOWN"}
CASES_PER_METHOD = int(os.environ.get("PNC_FUZZ_CASES", 250))  # more: PNC_FUZZ_CASES=5000


@pytest.fixture(scope="module")
def live(tmp_path_factory, zoo_dir, default_clone):
    """A receiver holding one verified package; ``(client, package id, process)``."""
    store = tmp_path_factory.mktemp("fuzz-store")
    proc, port = spawn_daemon("receiver", ["--listen", "127.0.0.1:0", "--zoo", str(zoo_dir),
                                           "--store", str(store)])
    client = PncClient(f"127.0.0.1:{port}", timeout_s=20, max_attempts=1)
    pid, _ = client.send_package(wire.encode(default_clone.package))
    yield client, pid, proc
    client.close()
    stop_daemon(proc)


def _texts(pid: str) -> st.SearchStrategy[str]:
    pieces = st.sampled_from([
        pid, pid[:12], pid[:3], "packages", "blobs", f"packages/{pid}", f"packages/{pid}/1",
        f"blobs/{'0' * 64}/5", f"packages/{pid}/\u00b2", "../../etc/passwd", "/", "", "0" * 64,
        "9" * 40, "\u0661\u0662", "\x00", "packages//", "Z" * 300])
    return st.one_of(pieces, st.text(max_size=80),
                     st.builds("/".join, st.lists(pieces | st.text(max_size=8), max_size=4)))


def _message(descriptor, pid: str, depth: int = 0) -> st.SearchStrategy:
    """A strategy for one message of ``descriptor`` (a dict of field values)."""
    fields = {}
    for f in descriptor.fields:
        value = _field(f, pid, depth)
        is_repeated = f.is_repeated if hasattr(f, "is_repeated") else f.label == F.LABEL_REPEATED
        fields[f.name] = st.lists(value, max_size=3) if is_repeated else value
    return st.fixed_dictionaries({}, optional=fields)


def _field(f, pid: str, depth: int) -> st.SearchStrategy:
    if f.type == F.TYPE_MESSAGE:
        return _message(f.message_type, pid, depth + 1) if depth < 2 else st.just({})
    if f.type == F.TYPE_STRING:
        return _texts(pid)
    if f.type == F.TYPE_BYTES:
        return st.binary(max_size=256)
    if f.type == F.TYPE_BOOL:
        return st.booleans()
    if f.type in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    if f.type == F.TYPE_ENUM:
        return st.integers(0, 5)
    unsigned = f.type in (F.TYPE_UINT32, F.TYPE_UINT64, F.TYPE_FIXED32, F.TYPE_FIXED64)
    bits = 32 if f.type in (F.TYPE_UINT32, F.TYPE_INT32, F.TYPE_FIXED32, F.TYPE_SINT32) else 64
    low = 0 if unsigned else -(1 << (bits - 1))
    high = (1 << bits) - 1 if unsigned else (1 << (bits - 1)) - 1
    return st.one_of(st.integers(0, 4096), st.integers(low, high))


def _build(cls, values: dict):
    msg = cls()
    for name, value in values.items():
        field = getattr(msg, name)
        if isinstance(value, dict):
            _fill(field, value)
        elif isinstance(value, list):
            for item in value:
                _fill(field.add(), item) if isinstance(item, dict) else field.append(item)
        else:
            setattr(msg, name, value)
    return msg


def _fill(msg, values: dict) -> None:
    msg.CopyFrom(_build(type(msg), values))


def _call(client: PncClient, method: str, request) -> str:
    """The status code name of one call (``OK`` when it succeeded)."""
    import grpc

    stub = {"FindMissing": client.cas, "GetCapabilities": client.cas, "Read": client.bytestream,
            "Write": client.bytestream, "QueryWriteStatus": client.bytestream}.get(
        method, client.packages)
    try:
        if method == "Write":
            stub.Write(iter(request), timeout=20)
        elif method == "Read":
            for _ in stub.Read(request, timeout=20):
                pass
        else:
            getattr(stub, method)(request, timeout=20)
        return "OK"
    except grpc.RpcError as err:
        return err.code().name


METHODS = {
    "FindMissing": tpb.FindMissingRequest, "GetCapabilities": tpb.CapabilitiesRequest,
    "QueryWriteStatus": tpb.QueryWriteStatusRequest, "Read": tpb.ReadRequest,
    "Write": tpb.WriteRequest, "List": tpb.ListRequest, "Stat": tpb.StatRequest,
    "ZooManifest": tpb.ZooManifestRequest, "Predict": tpb.PredictRequest,
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_no_request_gets_internal(live, method):
    client, pid, proc = live
    cls = METHODS[method]
    drawn = _message(cls.DESCRIPTOR, pid)
    requests = st.lists(drawn, max_size=3) if method == "Write" else drawn
    seen: dict[str, int] = {}

    @settings(max_examples=CASES_PER_METHOD, deadline=None, database=None,
              derandomize=bool(os.environ.get("CI")),  # CI: the same cases every run
              suppress_health_check=list(HealthCheck))
    @given(values=requests)
    def check(values):
        request = [_build(cls, v) for v in values] if method == "Write" else _build(cls, values)
        code = _call(client, method, request)
        seen[code] = seen.get(code, 0) + 1
        assert code not in BAD_CODES, (method, request)

    check()
    assert proc.poll() is None, "the daemon died"
    assert client.health() == "SERVING"
    assert sum(seen.values()) >= (CASES_PER_METHOD if cls.DESCRIPTOR.fields else 1)

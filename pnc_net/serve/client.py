"""The edge client: send, fetch, predict and status against a pnc daemon.

``with PncClient("127.0.0.1:7000", token=...) as c: c.send_package(data)``.
Writes are resumable (QueryWriteStatus, then Write from the committed offset),
reads verify the digest and retry a bounded number of times, every call has a
deadline, and a failed call raises the project's own error type with the
server's status in one line.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pnc_net import codec
from pnc_net._proto import transport_pb2 as tpb
from pnc_net._proto import transport_pb2_grpc as tgrpc
from pnc_net.errors import (
    ERROR_CLASS_KEY,
    IntegrityError,
    InvalidInputError,
    PncError,
    RemoteError,
    error_from_status,
)
from pnc_net.fsutil import Sha256Stream, sha256_bytes
from pnc_net.serve.channel import (
    CHANNEL_OPTIONS,
    CHUNK_BYTES,
    MAX_BLOB_BYTES,
    check_address,
    check_digest,
)
from pnc_net.serve.framing import frame_write_request, read_payload
from pnc_net.serve.retry import retry

T = TypeVar("T")

log = logging.getLogger("pnc.client")
# An attempt's deadline allows for the bytes it has left at this rate (512 kbit/s), plus
# timeout_s. A slower link still finishes: an attempt cut off by its deadline after
# moving bytes does not count against max_attempts, and the next resumes.
MIN_RATE_BYTES_S = 64 << 10
MIN_CHUNK_BYTES = 16 << 10  # the smallest chunk (or read window) stalls shrink to
# a paced write polls QueryWriteStatus after PACE_FIRST_S, then at doubling intervals up to
# PACE_MAX_S (each poll costs the server a call; an interval too long idles both ends)
PACE_FIRST_S, PACE_MAX_S = 0.0002, 0.005
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED)


def remote_error(address: str, err: grpc.RpcError) -> PncError:
    """The pnc error for a failed call, with the server's message on one line: the class
    the server named in its trailing metadata, else the closest one for the status."""
    code = err.code().name if err.code() else "UNKNOWN"
    details = (err.details() or "").replace("\n", " ")
    trailing = dict(err.trailing_metadata() or ()) if hasattr(err, "trailing_metadata") else {}
    return error_from_status(code, f"{address}: {code}: {details}", trailing.get(ERROR_CLASS_KEY))


def channel_credentials(tls_ca: Path | None, tls_cert: Path | None,
                        tls_key: Path | None) -> grpc.ChannelCredentials | None:
    if tls_ca is None and tls_cert is None:
        return None
    if (tls_cert is None) != (tls_key is None):
        raise InvalidInputError("give --tls-cert and --tls-key together (client certificate)")
    def read(path: Path | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    try:
        return grpc.ssl_channel_credentials(read(tls_ca), read(tls_key), read(tls_cert))
    except OSError as err:
        raise InvalidInputError(f"cannot read TLS file: {err}") from None


class PncClient:
    """A connection to one daemon (sender or receiver)."""

    def __init__(self, address: str, token: str | None = None, *, tls_ca: Path | None = None,
                 tls_cert: Path | None = None, tls_key: Path | None = None,
                 timeout_s: float = 30.0, max_attempts: int = 6,
                 tls_server_name: str | None = None) -> None:
        self.address = check_address(address)
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        creds = channel_credentials(tls_ca, tls_cert, tls_key)
        opts: list[tuple[str, int | str]] = list(CHANNEL_OPTIONS)
        if creds is None:
            self.channel = grpc.insecure_channel(address, options=opts)
        else:
            if tls_server_name:
                opts.append(("grpc.ssl_target_name_override", tls_server_name))
            self.channel = grpc.secure_channel(address, creds, options=opts)
        self.cas = tgrpc.CasStub(self.channel)
        self.bytestream = tgrpc.ByteStreamStub(self.channel)
        self.packages = tgrpc.PackagesStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        # Blob bytes travel without protobuf copies: Read answers arrive as the serialized
        # message (``framing.read_payload`` takes the data out as a view) and Write requests are
        # framed by hand (``_chunks``). The stubs above stay for everything else.
        self._read_raw = self.channel.unary_stream(
            "/pnc.v1.ByteStream/Read", request_serializer=tpb.ReadRequest.SerializeToString,
            response_deserializer=None)
        self._write_raw = self.channel.stream_unary(
            "/pnc.v1.ByteStream/Write", request_serializer=None,
            response_deserializer=tpb.WriteResponse.FromString)
        self.last_write: tpb.WriteResponse | None = None
        self._link_chunk = CHUNK_BYTES  # shrinks on a link that breaks streams (write_blob)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel (the context manager does it for you)."""
        self.channel.close()

    def _call(self, fn, request, timeout: float | None = None):
        try:
            return fn(request, timeout=timeout or self.timeout_s, metadata=self.metadata)
        except grpc.RpcError as err:
            raise remote_error(self.address, err) from None

    # ------------------------------------------------------------------ writes
    def send_package(self, data: bytes) -> tuple[str, int]:
        """Send package bytes; returns ``(id, bytes sent)``. The frame, message and format
        version are checked here (without torch); the daemon checks the rest. Its answer
        (state, detail) is in ``self.last_write``."""
        codec.parse(data)
        pid = sha256_bytes(data)
        return pid, self.write_blob("packages", data)

    def write_blob(self, kind: str, data: bytes, on_chunk=None,
                   max_unacked: int | None = 0, chunk_bytes: int = CHUNK_BYTES,
                   sha256: str | None = None) -> int:
        """Resumable upload; returns the payload bytes sent (re-sent chunks included).

        ``sha256``: the digest of ``data`` when the caller knows it (a zoo manifest names
        its weights), which saves hashing ``data`` before the first byte goes; the server
        hashes every byte either way and stores nothing whose digest differs.

        ``max_unacked`` bounds the bytes handed to gRPC beyond the server's committed
        size (polled with QueryWriteStatus before each chunk). The default 0 means a
        broken stream re-sends at most the one chunk in flight, at some cost in
        throughput for multi-MiB blobs (a package is one chunk, so it costs nothing);
        None streams unpaced, and HTTP/2 flow control may then hold several MiB in
        flight that a restarted server never received.

        Slow and lossy links: each attempt resumes from the committed size and has a
        deadline for the bytes it still has to send at ``MIN_RATE_BYTES_S``; an attempt
        that got more bytes committed does not count against ``max_attempts``, which
        bounds consecutive attempts without progress. When the link breaks a stream and
        the break lost as much as the attempt got through, the chunk size (from
        ``chunk_bytes``) shrinks (see ``_smaller``, down to ``MIN_CHUNK_BYTES``): a link
        that breaks every few hundred KB never carries a whole 1 MiB chunk. The client
        remembers the size for its later reads and writes."""
        sha = check_digest(sha256, what="blob digest") if sha256 else sha256_bytes(data)
        size = len(data)
        name = f"{kind}/{sha}/{size}"
        resent = [0]  # payload bytes of attempts that failed
        committed = [0]  # the most the server is known to have committed
        chunk = [max(MIN_CHUNK_BYTES, min(chunk_bytes, CHUNK_BYTES,
                                          self._link_chunk))]

        def seen(n: int) -> None:
            committed[0] = max(committed[0], n)

        def query(timeout: float) -> tpb.QueryWriteStatusResponse:
            status = self.bytestream.QueryWriteStatus(
                tpb.QueryWriteStatusRequest(resource_name=name), timeout=timeout,
                metadata=self.metadata)
            seen(size if status.complete else int(status.committed_size))
            return status

        def attempt() -> int:
            counter, failed = [0], threading.Event()
            status = query(self.timeout_s)
            if status.complete:
                self.last_write = tpb.WriteResponse(committed_size=size,
                                                    state=self._state(kind, sha))
                return resent[0]
            offset, step = int(status.committed_size), chunk[0]
            pace = None if max_unacked is None else (
                lambda target: self._wait_committed(name, target, failed, step, seen))
            try:
                self.last_write = self._write_raw(
                    _chunks(name, data, offset, counter, on_chunk, pace, max_unacked or 0,
                            step),
                    timeout=_deadline(self.timeout_s, size - offset), metadata=self.metadata)
            except grpc.RpcError as err:
                failed.set()  # a pacing wait still polling stops handing out chunks
                resent[0] += counter[0]
                try:  # what got through, so a stream that moved is not held against us
                    query(min(self.timeout_s, 5.0))
                except grpc.RpcError:
                    pass
                if _link_broke(err):
                    chunk[0] = _smaller(step, max(0, committed[0] - offset), counter[0])
                    self._link_chunk = chunk[0]
                raise
            seen(size)
            return resent[0] + counter[0]

        return self._retrying(attempt, progress=lambda: committed[0])

    def _retrying(self, fn: Callable[[], T], progress: Callable[[], int] | None = None) -> T:
        """``fn`` under the client's retry policy; a final gRPC error as a pnc error.

        With ``progress`` (bytes committed or read so far), ``max_attempts`` bounds the
        consecutive attempts that moved nothing, not all attempts (see ``retry``)."""
        try:
            return retry(fn, attempts=self.max_attempts, retryable=_retryable,
                         progress=progress)
        except grpc.RpcError as err:
            raise remote_error(self.address, err) from None

    def _wait_committed(self, name: str, target: int, failed: threading.Event,
                        chunk: int = CHUNK_BYTES,
                        seen: Callable[[int], None] | None = None) -> bool:
        """Block until the server has committed ``target`` bytes of ``name``. False once the
        stream has failed, so no further chunk is handed to a dead stream (a chunk counted
        as sent then really was in flight); True, pacing given up, after ``timeout_s`` plus
        one ``chunk`` at ``MIN_RATE_BYTES_S``. ``seen(n)`` hears each committed size."""
        pause = PACE_FIRST_S
        end = time.monotonic() + _deadline(self.timeout_s, chunk)
        while not failed.is_set():
            if time.monotonic() >= end:
                return True
            try:
                st = self.bytestream.QueryWriteStatus(
                    tpb.QueryWriteStatusRequest(resource_name=name), timeout=5,
                    metadata=self.metadata)
            except grpc.RpcError:
                st = None  # the server is gone; its stream fails on its own, which sets failed
            if st is not None and seen is not None and not st.complete:
                seen(int(st.committed_size))
            if st is not None and (st.complete or st.committed_size >= target):
                return True
            failed.wait(pause)
            pause = min(pause * 2, PACE_MAX_S)
        return False

    def _state(self, kind: str, sha: str) -> str:
        if kind != "packages":
            return ""
        return self.stat(sha).state

    # ------------------------------------------------------------------ reads
    def read_blob(self, kind: str, sha256: str, size: int | None = None) -> bytes:
        """Read a blob by digest, resuming after a broken stream, verifying the digest.

        Each attempt resumes from the bytes already arrived, with a deadline for the
        rest at ``MIN_RATE_BYTES_S``; attempts that brought bytes do not count against
        ``max_attempts``. When the link breaks the stream and the message lost was as
        large as what the attempt brought, the rest is read in smaller windows
        (``read_limit``, see ``_smaller``), as a write on this client would send.

        The bytes are hashed as they arrive (on a second thread once a blob is larger
        than a few chunks, overlapping the transfer) and copied once, from each message
        gRPC delivered straight into the bytes object returned (``_Assembly``).
        A server that sends more than ``size`` (or ``MAX_BLOB_BYTES``) is refused at
        the message that runs over, so memory stays bounded by what was asked for."""
        name = f"{kind}/{sha256}" + (f"/{size}" if size is not None else "")
        cap = MAX_BLOB_BYTES if size is None else size
        blob = _Assembly(size)
        held = [0]  # bytes arrived so far (where the next attempt resumes)
        digest = Sha256Stream(inline_bytes=4 * CHUNK_BYTES)
        learned = self._link_chunk  # what this link carried before
        window = [0 if learned >= CHUNK_BYTES else learned]  # 0: the rest in one Read

        def attempt() -> None:  # resumes from what already arrived
            start = held[0]
            try:
                while True:
                    limit, got = window[0], 0
                    rest = limit or max(0, (size or 0) - held[0])
                    for raw in self._read_raw(
                            tpb.ReadRequest(resource_name=name, read_offset=held[0],
                                            read_limit=limit),
                            timeout=_deadline(self.timeout_s, rest), metadata=self.metadata):
                        holder, at = read_payload(raw)
                        n = len(holder) - at
                        if held[0] + n > cap:
                            raise IntegrityError(
                                f"{self.address}: blob {sha256[:16]} runs past "
                                f"{'its size' if size is not None else 'the blob limit'} "
                                f"{cap} bytes; not saved")
                        blob.add(holder, at)
                        digest.update(memoryview(holder)[at:])
                        held[0] += n
                        got += n
                    if not limit or got < limit or (size is not None and held[0] >= size):
                        return
            except grpc.RpcError as err:
                if _link_broke(err):  # at most one message (a window, or a chunk) was lost
                    step = window[0] or CHUNK_BYTES
                    window[0] = _smaller(step, held[0] - start, held[0] - start + step)
                    self._link_chunk = window[0]
                raise

        try:
            self._retrying(attempt, progress=lambda: held[0])
            data = blob.result()  # while the hashing thread finishes the last chunks
            got_digest = digest.hexdigest()
        finally:
            digest.close()
        if got_digest != sha256 or (size is not None and len(data) != size):
            raise IntegrityError(f"{self.address}: blob {sha256[:16]} arrived with a different "
                                 f"digest ({len(data)} bytes); not saved")
        return data

    def fetch_package(self, id_or_prefix: str) -> bytes:
        """A package's bytes by id or unique prefix, digest verified."""
        info = self.stat(id_or_prefix)
        return self.read_blob("packages", info.id, info.size_bytes)

    # ------------------------------------------------------------------ queries
    def find_missing(self, kind: str, digests: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """Which of ``digests`` (sha256, size) the daemon lacks."""
        req = tpb.FindMissingRequest(kind=kind, digests=[
            tpb.Digest(sha256=s, size_bytes=n) for s, n in digests])
        resp = self._call(self.cas.FindMissing, req)
        return [(d.sha256, int(d.size_bytes)) for d in resp.missing]

    def capabilities(self) -> tpb.Capabilities:
        """The daemon's limits, role, version and whether it needs a token."""
        return self._call(self.cas.GetCapabilities, tpb.CapabilitiesRequest())

    def list(self) -> list[tpb.PackageInfo]:
        """Every package the daemon holds, with its state."""
        return list(self._call(self.packages.List, tpb.ListRequest()).packages)

    def stat(self, id_or_prefix: str) -> tpb.PackageInfo:
        """One package's record (state, fingerprint error, labels...)."""
        return self._call(self.packages.Stat, tpb.StatRequest(id=id_or_prefix))

    def zoo_manifest(self, sha256: str) -> str:
        """The manifest JSON of a zoo model the daemon holds (a mirror's answer)."""
        return self._call(self.packages.ZooManifest,
                          tpb.ZooManifestRequest(sha256=sha256)).manifest_json

    def predict(self, id_or_prefix: str, x: np.ndarray) -> tpb.PredictResponse:
        """Predictions of the receiver's superbody for ``x`` (N, C, H, W) (or a tensor)."""
        arr = np.asarray(x, dtype=np.float32)
        req = tpb.PredictRequest(package_id=id_or_prefix,
                                 inputs=codec.array_to_proto("inputs", arr, "fp32"))
        return self._call(self.packages.Predict, req, timeout=max(self.timeout_s, 60))

    def health(self, service: str = "") -> str:
        """``SERVING``, ``NOT_SERVING``, ... of the daemon (no token needed)."""
        resp = self._call(self.health_stub.Check, health_pb2.HealthCheckRequest(service=service),
                          timeout=min(self.timeout_s, 5))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Block until the channel connects; ``RemoteError`` after ``timeout_s``."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise RemoteError(f"{self.address}: no daemon answered within {timeout_s:.0f} s",
                              "UNAVAILABLE") from None


class MirrorFetcher:
    """A ``Node``'s model fetcher: a zoo model by digest from the first mirror that has it.

    Returns ``(manifest JSON, weights)``; the node checks the manifest and the zoo the
    weights' digest. A mirror that fails is logged and the next one tried."""

    def __init__(self, mirrors: tuple[str, ...], client_kwargs: dict | None = None) -> None:
        self.mirrors = tuple(check_address(m) for m in mirrors)
        self.client_kwargs = client_kwargs or {}

    def __str__(self) -> str:
        return ", ".join(self.mirrors) or "no mirror configured"

    def __call__(self, sha256: str, size: int) -> tuple[str, bytes] | None:
        for mirror in self.mirrors:
            try:
                with PncClient(mirror, **self.client_kwargs) as c:
                    return c.zoo_manifest(sha256), c.read_blob("blobs", sha256, size)
            except PncError as err:
                log.warning("mirror %s could not supply %s: %s", mirror, sha256[:12], err)
        return None


def _retryable(err: BaseException) -> bool:
    """Whether a failed call is worth another attempt (the server or the link, not us)."""
    return isinstance(err, grpc.RpcError) and err.code() in RETRYABLE


def _link_broke(err: BaseException) -> bool:
    """Whether a stream failed the way a broken or too slow link fails it."""
    return isinstance(err, grpc.RpcError) and err.code() in (
        grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _smaller(step: int, moved: int, handed: int) -> int:
    """The chunk size after a stream of ``step``-byte chunks broke having moved ``moved``
    bytes of the ``handed`` it was given: kept while a break loses less than an attempt
    gets through; halved otherwise; quartered when nothing got through at all."""
    lost = handed - moved
    if lost <= 0 or lost < moved:
        return step
    return max(MIN_CHUNK_BYTES, step // (4 if moved == 0 else 2))


def _deadline(timeout_s: float, remaining: int) -> float:
    """An attempt's deadline: ``timeout_s`` plus ``remaining`` bytes at the floor rate."""
    return timeout_s + remaining / MIN_RATE_BYTES_S


def _chunks(name: str, data: bytes, offset: int, counter: list[int], on_chunk=None,
            pace=None, max_unacked: int = 0,
            chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The serialized Write requests for ``data`` from ``offset``, ``chunk_bytes`` each;
    ``counter`` adds up the payload handed out, ``pace(target)`` (False: stop) waits for
    the server to commit up to ``max_unacked`` bytes behind the chunk about to go.

    Each request is framed by hand (``framing.frame_write_request``): the bytes are copied once, from
    ``data`` into the message, where a protobuf message would copy them three times."""
    view = memoryview(data)
    start = offset
    first = True
    if offset >= len(data):
        yield frame_write_request(name, offset, True, view[0:0])
        return
    while offset < len(data):
        piece = view[offset: offset + chunk_bytes]
        end = offset + len(piece)
        req = frame_write_request(name if first else "", offset, end == len(data), piece)
        first = False
        if pace is not None and offset - max_unacked > start and not pace(offset - max_unacked):
            return  # the stream failed: the caller resumes from the committed size or raises
        counter[0] += len(piece)
        if on_chunk is not None:
            on_chunk(end)
        yield req
        offset = end


def _bytes_allocator() -> Callable[[int], bytes] | None:
    """CPython's ``PyBytes_FromStringAndSize(NULL, n)``: a new, unshared bytes object whose
    contents the caller fills (what C extensions do); None where ctypes cannot reach it."""
    try:
        fn = ctypes.pythonapi.PyBytes_FromStringAndSize
    except (AttributeError, OSError):  # not CPython
        return None
    fn.restype, fn.argtypes = ctypes.py_object, [ctypes.c_char_p, ctypes.c_ssize_t]
    return lambda n: fn(None, n)


_NEW_BYTES = _bytes_allocator()
ASSEMBLE_MIN_BYTES = 4 * CHUNK_BYTES  # smaller blobs are joined: nothing to gain


def _address(b: bytes) -> int:
    """The address of a bytes object's contents (ctypes passes it for ``c_char_p``)."""
    addr = ctypes.cast(ctypes.c_char_p(b), ctypes.c_void_p).value
    assert addr is not None
    return addr


class _Assembly:
    """A read blob's bytes, put together as they arrive.

    With the size known (and past ``ASSEMBLE_MIN_BYTES``) the result is allocated once,
    up front, and each message's data is copied into it as it arrives (``memmove``,
    which releases the GIL), so the message's memory is reused for the next one and the
    blob is copied once, into memory touched once. Otherwise the messages are kept and
    joined at the end (one copy too, but into fresh memory after holding the messages).
    Callers check that no more than the size arrives before ``add``."""

    def __init__(self, size: int | None) -> None:
        self._target: bytes | None = None
        self._parts: list[memoryview] = []
        self.n = 0
        if size is not None and size >= ASSEMBLE_MIN_BYTES and _NEW_BYTES is not None:
            self._target = _NEW_BYTES(size)
            self._addr = _address(self._target)

    def add(self, holder: bytes, start: int) -> None:
        """Append ``holder[start:]``."""
        n = len(holder) - start
        if self._target is not None:
            if self.n + n > len(self._target):
                raise IntegrityError(f"{self.n + n} bytes arrived for {len(self._target)}")
            ctypes.memmove(self._addr + self.n, _address(holder) + start, n)
        else:
            self._parts.append(memoryview(holder)[start:])
        self.n += n

    def result(self) -> bytes:
        """The bytes that arrived (the whole blob once ``n`` is its size)."""
        if self._target is not None:
            return self._target if self.n == len(self._target) else self._target[: self.n]
        data = b"".join(self._parts)
        self._parts = []
        return data


__all__ = ["PncClient", "RemoteError", "remote_error"]

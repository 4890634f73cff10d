"""The gRPC side of a daemon: servicers, the bearer-token interceptor, server assembly.

The sync ``grpc.server`` with a thread pool is used (measured against
``grpc.aio`` in ``docs/protocol.md``): Predict and verification run torch on
the handler thread, and the streaming throughput of both was the same within
noise on loopback. Every handler turns a ``PncError`` into its gRPC status
with a one-line message; anything else is logged and answered ``INTERNAL``.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from concurrent import futures
from dataclasses import dataclass, fields
from functools import wraps
from itertools import chain
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pnc_net import __version__, wire
from pnc_net._proto import transport_pb2 as tpb
from pnc_net._proto import transport_pb2_grpc as tgrpc
from pnc_net.client import CHANNEL_OPTIONS, CHUNK_BYTES, MAX_MESSAGE_BYTES
from pnc_net.errors import InvalidInputError, PncError
from pnc_net.fsutil import atomic_write_bytes  # noqa: F401 - documented contract
from pnc_net.node import Node
from pnc_net.store import KINDS, PackageRecord, check_digest

log = logging.getLogger("pnc.rpc")
MAX_BLOB_BYTES = 4 << 30
WILDCARD_HOSTS = ("0.0.0.0", "[::]", "::", "")


def parse_resource(name: str, need_size: bool) -> tuple[str, str, int | None]:
    """``kind/sha256[/size]`` -> parts; anything else (paths, ``../x``) is refused."""
    parts = name.split("/")
    if len(parts) not in (2, 3) or parts[0] not in KINDS or (need_size and len(parts) != 3):
        raise InvalidInputError(
            f"resource name {name[:100]!r} is not "
            f"{'|'.join(KINDS)}/<sha256>{'/<size>' if need_size else '[/<size>]'}")
    sha = check_digest(parts[1], what="resource digest")
    size = None
    if len(parts) == 3:
        if not parts[2].isdigit():
            raise InvalidInputError(f"resource size {parts[2][:40]!r} is not a number")
        size = int(parts[2])
        limit = wire.MAX_PACKAGE_BYTES if parts[0] == "packages" else MAX_BLOB_BYTES
        if size > limit:
            raise InvalidInputError(f"{parts[0]} of {size} bytes exceed the limit {limit}")
    return parts[0], sha, size


def rpc(fn):
    """Map pnc errors to statuses, log every call in one structured line."""

    @wraps(fn)
    def wrapper(self, request, context):
        start = time.perf_counter()
        code = "OK"
        try:
            return fn(self, request, context)
        except PncError as err:
            code = err.grpc_code
            context.abort(getattr(grpc.StatusCode, err.grpc_code), str(err))
        except Exception as err:
            if isinstance(err, grpc.RpcError) or context.code() is not None:
                code = "ABORTED"
                raise
            code = "INTERNAL"
            log.exception("internal error in %s", fn.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}")
        finally:
            log.info("rpc", extra={"rpc": fn.__name__, "code": code, "peer": context.peer(),
                                   "ms": round((time.perf_counter() - start) * 1e3, 2)})

    return wrapper


def info_proto(r: PackageRecord) -> tpb.PackageInfo:
    import json

    return tpb.PackageInfo(
        id=r.id, size_bytes=r.size_bytes, state=r.state, detail=r.detail,
        received_unix_s=r.received_unix_s, target=r.target, sources=r.sources,
        label_names=r.label_names, format_version=r.format_version,
        fingerprint_error=r.fingerprint_error or 0.0,
        fingerprint_error_before=r.fingerprint_error_before or 0.0,
        metadata_json=json.dumps(r.metadata, sort_keys=True, default=float))


class Servicer(tgrpc.CasServicer, tgrpc.ByteStreamServicer, tgrpc.PackagesServicer):
    """All three services over one ``Node``."""

    def __init__(self, node: Node, auth_required: bool = False, on_package=None) -> None:
        self.node, self.auth_required, self.on_package = node, auth_required, on_package
        self._writing: set[str] = set()
        self._writing_lock = threading.Lock()

    # ------------------------------------------------------------------ CAS
    @rpc
    def FindMissing(self, request, context):
        if request.kind not in KINDS:
            raise InvalidInputError(f"unknown kind {request.kind!r}; use one of {list(KINDS)}")
        missing = [d for d in request.digests
                   if not self.node.has(request.kind, check_digest(d.sha256))]
        return tpb.FindMissingResponse(missing=missing)

    @rpc
    def GetCapabilities(self, request, context):
        return tpb.Capabilities(max_message_bytes=MAX_MESSAGE_BYTES, chunk_bytes=CHUNK_BYTES,
                                package_format_versions=list(wire.READABLE_VERSIONS),
                                role=self.node.role, pnc_version=__version__,
                                auth_required=self.auth_required)

    # ------------------------------------------------------------------ ByteStream
    @rpc
    def QueryWriteStatus(self, request, context):
        kind, sha, size = parse_resource(request.resource_name, need_size=True)
        if self.node.has(kind, sha):
            return tpb.QueryWriteStatusResponse(committed_size=size, complete=True)
        committed = self.node.store.upload(kind, sha, size).committed_size()
        return tpb.QueryWriteStatusResponse(committed_size=committed, complete=False)

    @rpc
    def Read(self, request, context):
        kind, sha, _ = parse_resource(request.resource_name, need_size=False)
        path = self.node.blob_path(kind, sha)
        total = path.stat().st_size
        if request.read_offset > total:
            raise InvalidInputError(f"read_offset {request.read_offset} is past the end ({total})")
        end = total if not request.read_limit else min(total, request.read_offset
                                                       + request.read_limit)
        return self._read_file(path, request.read_offset, end)

    def _read_file(self, path: Path, offset: int, end: int):
        with open(path, "rb") as f:
            f.seek(offset)
            while offset < end:
                data = f.read(min(CHUNK_BYTES, end - offset))
                if not data:
                    break
                offset += len(data)
                self.node.stats_bytes("out", len(data))
                yield tpb.ReadResponse(data=data)

    @rpc
    def Write(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None:
            raise InvalidInputError("empty write stream")
        kind, sha, size = parse_resource(first.resource_name, need_size=True)
        name = f"{kind}/{sha}/{size}"
        if self.node.has(kind, sha):
            return self._already(kind, sha, size)
        with self._writing_lock:
            if name in self._writing:
                context.abort(grpc.StatusCode.ABORTED, f"{name} is being written by another "
                              "client; retry after it finishes")
            self._writing.add(name)
        try:
            return self._write(kind, sha, size, chain([first], request_iterator), context)
        finally:
            with self._writing_lock:
                self._writing.discard(name)

    def _already(self, kind: str, sha: str, size: int) -> tpb.WriteResponse:
        state = self.node.store.record(sha).state if kind == "packages" else ""
        return tpb.WriteResponse(committed_size=size, state=state)

    def _write(self, kind, sha, size, requests, context) -> tpb.WriteResponse:
        upload = self.node.store.upload(kind, sha, size)
        expected, finished = None, False
        try:
            for req in requests:
                if expected is None:
                    upload.open(req.write_offset)
                    expected = req.write_offset
                elif req.write_offset != expected:
                    raise InvalidInputError(f"write_offset {req.write_offset} where {expected} "
                                            "was expected")
                expected = upload.append(req.data)
                self.node.stats_bytes("in", len(req.data))
                if req.finish_write:
                    finished = True
                    break
            if not finished:  # the client stopped early: keep what arrived, for resumption
                return tpb.WriteResponse(committed_size=upload.committed_size())
            path = upload.finish()
        finally:
            upload.close()
        return self._commit(kind, sha, size, path)

    def _commit(self, kind: str, sha: str, size: int, path: Path) -> tpb.WriteResponse:
        if kind == "blobs":
            final = self.node.store.blob_path(sha)
            os.replace(path, final)
            _fsync_dir(final.parent)
            return tpb.WriteResponse(committed_size=size)
        try:
            record = self.node.accept(path.read_bytes())
        finally:
            path.unlink(missing_ok=True)
        if self.on_package is not None:
            self.on_package(record.id)
        return tpb.WriteResponse(committed_size=size, state=record.state, detail=record.detail)

    # ------------------------------------------------------------------ Packages
    @rpc
    def List(self, request, context):
        return tpb.ListResponse(packages=[info_proto(r) for r in self.node.store.list()])

    @rpc
    def Stat(self, request, context):
        return info_proto(self.node.store.record(request.id))

    @rpc
    def ZooManifest(self, request, context):
        return tpb.ZooManifestResponse(manifest_json=self.node.zoo_manifest(request.sha256))

    @rpc
    def Predict(self, request, context):
        x = wire.tensor_from_proto(request.inputs)
        pid, sb, probs = self.node.predict(request.package_id, x)
        conf, idx = probs.max(1)
        names = list(sb.label_names)
        preds = [tpb.Prediction(label=names[i], probability=float(c), probabilities=p.tolist())
                 for i, c, p in zip(idx.tolist(), conf, probs)]
        return tpb.PredictResponse(package_id=pid, label_names=names, predictions=preds)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- auth


class TokenInterceptor(grpc.ServerInterceptor):
    """``authorization: Bearer <token>`` on every call but health checks, else UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        def deny(request_or_iterator, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing or wrong bearer token; pass --token (or PNC_TOKEN)")

        self._deny = {
            (False, False): grpc.unary_unary_rpc_method_handler(deny),
            (False, True): grpc.unary_stream_rpc_method_handler(deny),
            (True, False): grpc.stream_unary_rpc_method_handler(deny),
            (True, True): grpc.stream_stream_rpc_method_handler(deny),
        }

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(handler_call_details)
        got = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(got).encode(), self._expected):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return self._deny[(handler.request_streaming, handler.response_streaming)]


# ----------------------------------------------------------------------------- server


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path | None = None  # set: clients must present a certificate signed by it (mTLS)

    def credentials(self) -> grpc.ServerCredentials:
        try:
            pair = (self.key.read_bytes(), self.cert.read_bytes())
            ca = self.ca.read_bytes() if self.ca else None
        except OSError as err:
            raise InvalidInputError(f"cannot read TLS file: {err}") from None
        return grpc.ssl_server_credentials([pair], root_certificates=ca,
                                           require_client_auth=ca is not None)


def check_listen(listen: str) -> str:
    host, _, port = listen.rpartition(":")
    if host in WILDCARD_HOSTS:
        raise InvalidInputError(f"--listen {listen!r}: give a specific interface address "
                                "(e.g. 127.0.0.1:7000), not a wildcard")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise InvalidInputError(f"--listen {listen!r} is not HOST:PORT")
    return listen


class ServerSettings:
    """What the sender's and receiver's frozen config dataclasses share: paths given as
    strings become ``Path`` (TOML and env vars give strings), the listen / TLS / metrics
    checks, the field names a TOML file may set, and the TLS files to serve with."""

    PATH_FIELDS: tuple[str, ...] = ()  # a plain class attribute, not a dataclass field

    def check_server_settings(self) -> None:
        for name in self.PATH_FIELDS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        check_listen(self.listen)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidInputError("give --tls-cert and --tls-key together")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise InvalidInputError(f"--metrics-port {self.metrics_port} is not a port")

    @classmethod
    def keys(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def tls(self) -> TlsFiles | None:
        return TlsFiles(self.tls_cert, self.tls_key, self.tls_ca) if self.tls_cert else None


@dataclass
class Daemon:
    """A started server plus what a graceful shutdown needs."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    servicer: Servicer

    def stop(self, grace_s: float = 10.0) -> None:
        """Health goes NOT_SERVING first; in-flight calls get ``grace_s`` to finish."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()


def build_server(node: Node, listen: str, token: str | None = None,
                 tls: TlsFiles | None = None, max_workers: int = 32,
                 on_package=None) -> Daemon:
    """A started gRPC server for ``node`` on ``listen`` (port 0 picks a free one)."""
    check_listen(listen)
    interceptors = [TokenInterceptor(token)] if token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers,
                                                    thread_name_prefix="pnc-rpc"),
                         interceptors=interceptors, options=CHANNEL_OPTIONS,
                         maximum_concurrent_rpcs=max_workers * 4)
    servicer = Servicer(node, auth_required=bool(token), on_package=on_package)
    tgrpc.add_CasServicer_to_server(servicer, server)
    tgrpc.add_ByteStreamServicer_to_server(servicer, server)
    tgrpc.add_PackagesServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [s.full_name for s in tpb.DESCRIPTOR.services_by_name.values()]
    _add_reflection(server, names)
    port = (server.add_secure_port(listen, tls.credentials()) if tls
            else server.add_insecure_port(listen))
    if port == 0:
        raise InvalidInputError(f"cannot listen on {listen}: the address is in use or invalid")
    server.start()
    for svc in ["", *names]:
        health_servicer.set(svc, health_pb2.HealthCheckResponse.SERVING)
    return Daemon(server, port, health_servicer, servicer)


def _add_reflection(server: grpc.Server, names: list[str]) -> None:
    try:
        from grpc_reflection.v1alpha import reflection
    except ImportError:  # optional: grpcurl works with --proto without it
        return
    reflection.enable_server_reflection([*names, reflection.SERVICE_NAME,
                                         health.SERVICE_NAME], server)

"""Server assembly: a started gRPC server for a ``Node``, and the settings both daemons share.

The sync ``grpc.server`` with a thread pool is used (measured against
``grpc.aio`` in ``docs/protocol.md``): Predict and verification run torch on
the handler thread, and the streaming throughput of both was the same within
noise on loopback. Building a server (``build_server``) is separate from
running it (``pnc_net.serve.daemon.run_until_signal``), so tests start real
servers on ``127.0.0.1:0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Self

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pnc_net._proto import transport_pb2 as tpb
from pnc_net._proto import transport_pb2_grpc as tgrpc
from pnc_net.errors import InvalidInputError
from pnc_net.serve.channel import CHANNEL_OPTIONS
from pnc_net.serve.daemon import Flag, load_settings, parse_flags
from pnc_net.serve.interceptors import PUBLISH, READ, ErrorInterceptor, TokenInterceptor
from pnc_net.serve.limits import Limits
from pnc_net.serve.node import Node
from pnc_net.serve.servicer import Servicer

WILDCARD_HOSTS = ("0.0.0.0", "[::]", "::", "")

#: The options both daemons take (``ServerSettings`` fields).
COMMON_FLAGS = (
    Flag("token", "--token", "Bearer token of publishers: every call.", env="PNC_TOKEN"),
    Flag("read_token", "--read-token", "Bearer token of readers (edge devices): reads, status "
         "and Predict, never a write.", env="PNC_READ_TOKEN"),
    Flag("tls_cert", "--tls-cert", "PEM certificate."),
    Flag("tls_key", "--tls-key", "PEM private key."),
    Flag("tls_ca", "--tls-ca", "PEM CA: clients must present a certificate signed by it "
         "(mTLS)."),
    Flag("metrics_port", "--metrics-port", "Serve Prometheus metrics on 127.0.0.1:PORT.",
         type=int),
    Flag("grace_s", "--grace", "Seconds in-flight calls get on SIGTERM [10].", type=float),
    Flag("max_workers", "--max-workers", "gRPC worker threads [32].", type=int),
    Flag("max_uploads", "--max-uploads", "Concurrent uploads of all callers [16].", type=int),
    Flag("max_streams_per_caller", "--max-streams-per-caller",
         "Concurrent uploads of one caller [4].", type=int),
    Flag("upload_idle_s", "--upload-idle", "Cancel an upload silent this long, s [30].",
         type=float),
    Flag("part_ttl_s", "--part-ttl", "Remove partial uploads untouched this long, s [86400].",
         type=float),
)


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path | None = None  # set: clients must present a certificate signed by it (mTLS)

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials from the PEM files (mTLS when ``ca`` is set)."""
        try:
            pair = (self.key.read_bytes(), self.cert.read_bytes())
            ca = self.ca.read_bytes() if self.ca else None
        except OSError as err:
            raise InvalidInputError(f"cannot read TLS file: {err}") from None
        return grpc.ssl_server_credentials([pair], root_certificates=ca,
                                           require_client_auth=ca is not None)


def check_listen(listen: str) -> str:
    """``HOST:PORT`` on a specific interface; wildcards are refused (bind 127.0.0.1)."""
    host, _, port = listen.rpartition(":")
    if host in WILDCARD_HOSTS:
        raise InvalidInputError(f"--listen {listen!r}: give a specific interface address "
                                "(e.g. 127.0.0.1:7000), not a wildcard")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise InvalidInputError(f"--listen {listen!r} is not HOST:PORT")
    return listen


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """What the sender's and receiver's frozen config dataclasses share: credentials, TLS,
    metrics, shutdown and resource limits; paths given as strings become ``Path`` (TOML
    and env vars give strings); one loader (``load``) for flags, variables and TOML."""

    # Plain class attributes, not dataclass fields: set by each daemon's config.
    SECTION: ClassVar[str] = ""  # "sender" or "receiver": the TOML table, the command
    DESCRIPTION: ClassVar[str] = ""
    FLAGS: ClassVar[tuple[Flag, ...]] = ()
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ()

    listen: str
    token: str | None = None  # publishers: every call
    read_token: str | None = None  # readers: no Write, no QueryWriteStatus
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None  # set: clients must present a certificate signed by it (mTLS)
    metrics_port: int | None = None
    grace_s: float = 10.0
    max_workers: int = Limits.max_workers
    max_uploads: int = Limits.max_uploads
    max_streams_per_caller: int = Limits.max_streams_per_caller
    upload_idle_s: float = Limits.upload_idle_s
    part_ttl_s: float = Limits.part_ttl_s

    @classmethod
    def load(cls, argv: Sequence[str] | None = None) -> Self:
        """The config from ``argv``, ``PNC_*`` variables, a ``--config`` TOML file and the
        defaults, in that order (``pnc sender serve ARGS`` passes ARGS through)."""
        flags, config = parse_flags(f"pnc {cls.SECTION} serve", cls.DESCRIPTION, cls.FLAGS,
                                    argv)
        return load_settings(cls, cls.SECTION, flags, config, cls.FLAGS)

    def limits(self) -> Limits:
        """The resource limits these settings give (checked when the config is built)."""
        return Limits(max_workers=self.max_workers, max_uploads=self.max_uploads,
                      max_streams_per_caller=self.max_streams_per_caller,
                      upload_idle_s=self.upload_idle_s, part_ttl_s=self.part_ttl_s)

    def tokens(self) -> dict[str, str]:
        """Bearer token -> role (``publish`` or ``read``) for the token interceptor."""
        out = {self.read_token: READ} if self.read_token else {}
        return {**out, **({self.token: PUBLISH} if self.token else {})}

    def check_server_settings(self) -> None:
        """Coerce path fields and check listen, TLS, metrics, tokens and limits."""
        for name in self.PATH_FIELDS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        check_listen(self.listen)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidInputError("give --tls-cert and --tls-key together")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise InvalidInputError(f"--metrics-port {self.metrics_port} is not a port")
        if self.read_token and not self.token:
            raise InvalidInputError("--read-token needs --token too (who may publish?)")
        if self.read_token and self.read_token == self.token:
            raise InvalidInputError("--read-token must differ from --token")
        if self.grace_s < 0:
            raise InvalidInputError("--grace must be >= 0 seconds")
        self.limits()

    def tls(self) -> TlsFiles | None:
        """The TLS files to serve with, or None for plaintext."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        return TlsFiles(self.tls_cert, self.tls_key, self.tls_ca)


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
        self.servicer.slots.stop()


def add_bytestream(servicer: Servicer, server: grpc.Server) -> None:
    """The ByteStream service as ``add_ByteStreamServicer_to_server`` registers it, except
    that ``Write`` takes its requests serialized (``framing.parse_write_request`` finds
    the data inside each one without the two copies protobuf's parser would make) and
    ``Read`` yields its answers serialized (``framing.frame_read_response``: protobuf's
    serializer held a Read to about 470 MB/s)."""
    handlers = {
        "Read": grpc.unary_stream_rpc_method_handler(
            servicer.Read, request_deserializer=tpb.ReadRequest.FromString,
            response_serializer=None),  # Servicer.Read yields framing.frame_read_response
        "Write": grpc.stream_unary_rpc_method_handler(
            servicer.Write, request_deserializer=None,
            response_serializer=tpb.WriteResponse.SerializeToString),
        "QueryWriteStatus": grpc.unary_unary_rpc_method_handler(
            servicer.QueryWriteStatus, request_deserializer=tpb.QueryWriteStatusRequest.FromString,
            response_serializer=tpb.QueryWriteStatusResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("pnc.v1.ByteStream",
                                                                          handlers),))
    server.add_registered_method_handlers("pnc.v1.ByteStream", handlers)


def build_server(node: Node, listen: str, tokens: dict[str, str] | None = None,
                 tls: TlsFiles | None = None, limits: Limits | None = None,
                 on_package=None) -> Daemon:
    """A started gRPC server for ``node`` on ``listen`` (port 0 picks a free one).

    ``tokens`` maps bearer tokens to roles (``ServerSettings.tokens``); none: no auth."""
    check_listen(listen)
    limits = limits or Limits()
    interceptors = [ErrorInterceptor(), *([TokenInterceptor(tokens)] if tokens else [])]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=limits.max_workers,
                                                    thread_name_prefix="pnc-rpc"),
                         interceptors=interceptors, options=CHANNEL_OPTIONS,
                         maximum_concurrent_rpcs=limits.max_workers * 4)
    servicer = Servicer(node, auth_required=bool(tokens), on_package=on_package, limits=limits)
    tgrpc.add_CasServicer_to_server(servicer, server)
    add_bytestream(servicer, server)
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

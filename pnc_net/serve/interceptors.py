"""Server interceptors: one maps errors to statuses and logs every call, one checks tokens.

Handlers raise the project's errors (``pnc_net.errors``) and never call
``context.abort`` themselves; ``ErrorInterceptor`` turns a ``PncError`` into
its gRPC status with a one-line message and names its class in trailing
metadata (``ERROR_CLASS_KEY``) so the client raises the same class. Anything
else is a bug: logged with its traceback and answered ``INTERNAL``.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal, Self

import grpc

from pnc_net.errors import (
    ERROR_CLASS_KEY,
    PermissionDeniedError,
    PncError,
    UnauthenticatedError,
)

log = logging.getLogger("pnc.rpc")
HEALTH_PREFIX = "/grpc.health.v1.Health/"


class ErrorInterceptor(grpc.ServerInterceptor):
    """Map pnc errors to statuses; log every call in one structured line."""

    def intercept_service(self, continuation, handler_call_details):
        """Wrap the handler so its errors become statuses and the call is logged."""
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        kind = _handler_kind(handler)
        behaviour = getattr(handler, kind)
        wrap = self._wrap_stream if handler.response_streaming else self._wrap_unary
        return handler._replace(**{kind: wrap(behaviour, method)})

    def _wrap_unary(self, behaviour: Callable, method: str) -> Callable:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            with _CallLog(method, context):
                return behaviour(request, context)

        return call

    def _wrap_stream(self, behaviour: Callable, method: str) -> Callable:
        def call(request: Any, context: grpc.ServicerContext) -> Iterator:
            with _CallLog(method, context):
                yield from behaviour(request, context)

        return call


def _handler_kind(handler: grpc.RpcMethodHandler) -> str:
    streaming = (handler.request_streaming, handler.response_streaming)
    return {(False, False): "unary_unary", (False, True): "unary_stream",
            (True, False): "stream_unary", (True, True): "stream_stream"}[streaming]


class _CallLog:
    """Times one call, maps its exception to a status, logs ``rpc code peer ms``."""

    def __init__(self, method: str, context: grpc.ServicerContext) -> None:
        self.method, self.context, self.code = method, context, "OK"

    def __enter__(self) -> Self:
        self.start = time.perf_counter()
        return self

    def __exit__(self, exc_type, err, tb) -> Literal[False]:
        try:
            if err is not None:
                self._abort(err)
        finally:
            log.info("rpc", extra={"rpc": self.method, "code": self.code,
                                   "peer": self.context.peer(),
                                   "ms": round((time.perf_counter() - self.start) * 1e3, 2)})
        return False

    def _abort(self, err: BaseException) -> None:
        if isinstance(err, PncError):
            self.code = err.grpc_code
            self.context.set_trailing_metadata(((ERROR_CLASS_KEY, type(err).__name__),))
            self.context.abort(getattr(grpc.StatusCode, err.grpc_code), str(err))
        if isinstance(err, grpc.RpcError) or self.context.code() is not None:
            self.code = "ABORTED"  # the call was already aborted or cancelled
            return
        if isinstance(err, GeneratorExit):
            self.code = "CANCELLED"  # the client went away while we streamed to it
            return
        self.code = "INTERNAL"
        log.error("internal error in %s", self.method, exc_info=(type(err), err, None))
        self.context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}")


PUBLISH, READ = "publish", "read"
#: Calls that change a daemon's store: a reader's token may not make them.
WRITE_METHODS = frozenset({"/pnc.v1.ByteStream/Write", "/pnc.v1.ByteStream/QueryWriteStatus"})


class TokenInterceptor(grpc.ServerInterceptor):
    """``authorization: Bearer <token>`` on every call but health checks, and roles: a
    ``read`` token may read, list and predict, a ``publish`` token may also write."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self._roles = [(f"Bearer {t}".encode(), role) for t, role in tokens.items()]
        self._deny = {
            UnauthenticatedError: _handlers(UnauthenticatedError(
                "missing or wrong bearer token; pass --token (or PNC_TOKEN)")),
            PermissionDeniedError: _handlers(PermissionDeniedError(
                "this token may only read and predict; publishing needs a publisher's token")),
        }

    def intercept_service(self, continuation, handler_call_details):
        """Pass the call on for a token whose role allows it (health needs none)."""
        method = handler_call_details.method
        if method.startswith(HEALTH_PREFIX):
            return continuation(handler_call_details)
        role = self._role(dict(handler_call_details.invocation_metadata or ()))
        if role == PUBLISH or (role == READ and method not in WRITE_METHODS):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        denied = self._deny[UnauthenticatedError if role is None else PermissionDeniedError]
        return denied[(handler.request_streaming, handler.response_streaming)]

    def _role(self, metadata: dict) -> str | None:
        got = str(metadata.get("authorization", "")).encode()
        role = None
        for expected, r in self._roles:  # compare with every token: no timing hint
            if hmac.compare_digest(got, expected):
                role = r
        return role


def _handlers(err: PncError) -> dict[tuple[bool, bool], grpc.RpcMethodHandler]:
    """A handler of each streaming kind that raises ``err`` (the error interceptor maps it)."""

    def deny(request_or_iterator, context):
        raise type(err)(str(err))

    return {
        (False, False): grpc.unary_unary_rpc_method_handler(deny),
        (False, True): grpc.unary_stream_rpc_method_handler(deny),
        (True, False): grpc.stream_unary_rpc_method_handler(deny),
        (True, True): grpc.stream_stream_rpc_method_handler(deny),
    }

"""One small error hierarchy for everything a user or a peer can get wrong.

Each error is also a builtin (``ValueError``, ``KeyError``...) so callers that
catch builtins keep working, and each carries the gRPC status name and the CLI
exit code it maps to. The CLI prints ``str(err)`` on one line and exits with
``exit_code``; the server's error interceptor (``pnc_net.serve.interceptors``)
turns it into a status and names the class in trailing metadata, and the
client (``error_from_status``) raises the same class again. Messages say what
was seen and what to do.
"""

from __future__ import annotations

from enum import IntEnum

#: Trailing-metadata key that names the pnc error class of a failed call.
ERROR_CLASS_KEY = "pnc-error-class"


class ExitCode(IntEnum):
    """Every exit code of ``pnc`` and the daemons, named once (``docs/operations.md``)."""

    OK = 0
    FAILURE = 1  # an unexpected error, or an OS error on a path the user named
    INVALID_INPUT = 2  # also click's usage errors: an unknown command or option
    NOT_FOUND = 3
    INTEGRITY = 4  # digest, size or fingerprint mismatch; a package the receiver marked failed
    PRECONDITION = 5
    INCOMPATIBLE = 6
    REMOTE = 7  # the daemon is unreachable or answered a status with no closer error
    DENIED = 8  # unauthenticated or not allowed
    TASKS_FAILED = 9  # a batch job ran, and some of its tasks failed (``python -m pnc_net.jobs``)
    INTERRUPTED = 130


class PncError(Exception):
    """Root of pnc's errors. ``grpc_code`` is a ``grpc.StatusCode`` name."""

    grpc_code = "INTERNAL"
    exit_code = ExitCode.FAILURE


class InvalidInputError(PncError, ValueError):
    """A malformed argument, data file or package."""

    grpc_code = "INVALID_ARGUMENT"
    exit_code = ExitCode.INVALID_INPUT


class NotFoundError(PncError, KeyError):
    """A model, package or blob that does not exist."""

    grpc_code = "NOT_FOUND"
    exit_code = ExitCode.NOT_FOUND

    def __str__(self) -> str:  # KeyError quotes its message; we do not want that.
        return str(self.args[0]) if self.args else ""


class IntegrityError(PncError, ValueError):
    """A digest, size or fingerprint that does not match what was promised."""

    grpc_code = "DATA_LOSS"
    exit_code = ExitCode.INTEGRITY


class PreconditionError(PncError, RuntimeError):
    """The operation is valid but the node is not ready for it (a missing zoo model)."""

    grpc_code = "FAILED_PRECONDITION"
    exit_code = ExitCode.PRECONDITION


class IncompatibleError(InvalidInputError):
    """A package or model pair that cannot work together (shapes, widths, versions).

    A kind of invalid input (callers catching ``InvalidInputError`` see it), with its
    own exit code so scripts can tell "malformed" from "does not fit this zoo"."""

    grpc_code = "INVALID_ARGUMENT"
    exit_code = ExitCode.INCOMPATIBLE


class BusyError(PncError, RuntimeError):
    """The same resource is being changed by another caller; retry after it finishes."""

    grpc_code = "ABORTED"
    exit_code = ExitCode.REMOTE


class ResourceExhaustedError(PncError, RuntimeError):
    """A daemon limit was reached (streams per caller, uploads, a queue); retry later."""

    grpc_code = "RESOURCE_EXHAUSTED"
    exit_code = ExitCode.REMOTE


class UnauthenticatedError(PncError, PermissionError):
    """A call without the right credentials (bearer token)."""

    grpc_code = "UNAUTHENTICATED"
    exit_code = ExitCode.DENIED


class PermissionDeniedError(PncError, PermissionError):
    """Authenticated, but not allowed to do this (a role, an untrusted publisher)."""

    grpc_code = "PERMISSION_DENIED"
    exit_code = ExitCode.DENIED


class RemoteError(PncError):
    """A daemon answered with a status that has no closer pnc error (UNAVAILABLE, ...)."""

    exit_code = ExitCode.REMOTE

    def __init__(self, message: str, code: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.grpc_code = code
        if code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            self.exit_code = ExitCode.DENIED


#: The classes a server may name in ``ERROR_CLASS_KEY``; anything else is not trusted.
_BY_NAME: dict[str, type[PncError]] = {cls.__name__: cls for cls in (
    InvalidInputError, NotFoundError, IntegrityError, PreconditionError, IncompatibleError,
    BusyError, ResourceExhaustedError, UnauthenticatedError, PermissionDeniedError)}
_BY_CODE: dict[str, type[PncError]] = {
    "INVALID_ARGUMENT": InvalidInputError, "NOT_FOUND": NotFoundError,
    "FAILED_PRECONDITION": PreconditionError, "DATA_LOSS": IntegrityError,
    "UNAUTHENTICATED": UnauthenticatedError, "PERMISSION_DENIED": PermissionDeniedError}


def error_from_status(code: str, message: str, class_name: str | None = None) -> PncError:
    """The pnc error for a failed call: the class the server named when it is one of
    ours and agrees with the status code, else the closest class for the code."""
    cls = _BY_NAME.get(class_name or "")
    if cls is not None and cls.grpc_code == code:
        return cls(message)
    by_code = _BY_CODE.get(code)
    return by_code(message) if by_code else RemoteError(message, code)

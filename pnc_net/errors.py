"""One small error hierarchy for everything a user can get wrong.

Each error is also a builtin (``ValueError``, ``KeyError``...) so callers that
catch builtins keep working, and each carries the gRPC status name and the CLI
exit code it maps to. The CLI prints ``str(err)`` on one line; the gRPC
interceptor turns it into a status. Messages say what was seen and what to do.
"""

from __future__ import annotations


class PncError(Exception):
    """Root of pnc's errors. ``grpc_code`` is a ``grpc.StatusCode`` name."""

    grpc_code = "INTERNAL"
    exit_code = 1


class InvalidInputError(PncError, ValueError):
    """A malformed argument, data file or package."""

    grpc_code = "INVALID_ARGUMENT"
    exit_code = 2


class NotFoundError(PncError, KeyError):
    """A model, package or blob that does not exist."""

    grpc_code = "NOT_FOUND"
    exit_code = 3

    def __str__(self) -> str:  # KeyError quotes its message; we do not want that.
        return str(self.args[0]) if self.args else ""


class IntegrityError(PncError, ValueError):
    """A digest, size or fingerprint that does not match what was promised."""

    grpc_code = "DATA_LOSS"
    exit_code = 4


class PreconditionError(PncError, RuntimeError):
    """The operation is valid but the node is not ready for it (a missing zoo model)."""

    grpc_code = "FAILED_PRECONDITION"
    exit_code = 5


class IncompatibleError(PncError, ValueError):
    """A package or model pair that cannot work together (shapes, widths, versions)."""

    grpc_code = "INVALID_ARGUMENT"
    exit_code = 6

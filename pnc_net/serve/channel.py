"""What both ends of a connection agree on: message and chunk sizes, addresses.

The server (``server.py``, ``servicer.py``) and the client (``client.py``) both
take their limits from here, so neither depends on the other.
"""

from __future__ import annotations

import re

from pnc_net.errors import InvalidInputError

CHUNK_BYTES = 1 << 20  # 1 MiB: the measured sweet spot of loopback gRPC (docs/protocol.md)
MAX_MESSAGE_BYTES = 4 << 20
MAX_BLOB_BYTES = 4 << 30  # the largest zoo blob a daemon accepts
CHANNEL_OPTIONS: list[tuple[str, int | str]] = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


MIN_PREFIX = 4  # hex digits of the shortest package id prefix a client may give
HEX = re.compile(r"^[0-9a-f]{1,64}$")


def check_digest(sha256: str, *, prefix_ok: bool = False, what: str = "id") -> str:
    """A digest a peer or a user gave, refused unless it is (a prefix of) a hex sha256."""
    value = sha256.strip().lower()
    if not HEX.match(value) or (not prefix_ok and len(value) != 64):
        shown = sha256[:80]
        raise InvalidInputError(
            f"{what} {shown!r} is not a sha256 hex digest"
            + (f" (or a unique prefix of at least {MIN_PREFIX} hex digits)" if prefix_ok else ""))
    if prefix_ok and len(value) < MIN_PREFIX:
        raise InvalidInputError(f"{what} prefix {sha256!r} is too short; give at least "
                                f"{MIN_PREFIX} hex digits")
    return value


def check_address(address: str) -> str:
    """``HOST:PORT`` with a numeric port; anything else is a user mistake."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInputError(f"address {address!r} is not HOST:PORT (e.g. 127.0.0.1:7000)")
    return address

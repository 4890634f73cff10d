"""Signed packages from trusted publishers: ed25519 keys, ``sign`` and ``verify``.

A publisher's key signs a package's name, version and content; a receiver started
with ``--trust KEY[,KEY]`` accepts only packages signed by one of those keys
(``docs/security.md``). Torch-free, and ``cryptography`` is imported only by the
functions that need it, so the edge client and ``pnc --help`` never load it.

What is signed: ``SIGNATURE_DOMAIN`` followed by the package's protobuf message
exactly as it is in the frame, minus the records of its ``signature`` field (11).
The verifier strips those records from the bytes it received; it never
re-serializes, so what it checks is what the publisher signed, whatever protobuf
library (or field order, or field unknown to this reader) wrote it.

Keys: a private key file is PKCS#8 PEM (what ``openssl pkey`` reads), written with mode
0600 and never over an existing file; a public key is one line of hex (32 bytes), its
key id the first 16 hex digits of its sha256.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pnc_net import codec
from pnc_net._proto import package_pb2 as pb
from pnc_net.errors import InvalidInputError, NotFoundError, PermissionDeniedError
from pnc_net.fsutil import atomic_write_bytes

SIGNATURE_DOMAIN = b"pnc-package-signature-v1\0"
SIGNATURE_FIELD = 11  # Package.signature
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
MAX_PACKAGE_NAME_CHARS = 128
MAX_PACKAGE_VERSION = (1 << 53) - 1  # an exact integer in JSON (records, --json output)


@dataclass(frozen=True)
class Verified:
    """Who signed a package (``key_id``, ``public_key``) and what it calls itself."""

    key_id: str
    public_key: bytes
    name: str
    version: int


# ----------------------------------------------------------------------------- keys


def _ed25519() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - cryptography is in pnc[full]
        raise InvalidInputError("signing needs the `cryptography` package: "
                                "pip install 'pnc[full]'") from None
    return ed25519


def key_id(public_key: bytes) -> str:
    """The short name of a public key: the first 16 hex digits of its sha256."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def generate_key() -> tuple[Any, bytes]:
    """A new ``(Ed25519PrivateKey, raw 32-byte public key)``."""
    private = _ed25519().Ed25519PrivateKey.generate()
    return private, _raw_public(private)


def _raw_public(private: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return private.public_key().public_bytes(serialization.Encoding.Raw,
                                             serialization.PublicFormat.Raw)


def write_key_pair(directory: str | Path, name: str) -> tuple[Path, Path, str]:
    """Generate a key pair into ``DIR/NAME.key`` (0600) and ``DIR/NAME.pub``; neither may
    exist yet. Returns ``(private path, public path, key id)``."""
    from cryptography.hazmat.primitives import serialization

    if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise InvalidInputError(f"key name {name[:80]!r} must be letters, digits, '-', '_', '.'")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = directory / f"{name}.key", directory / f"{name}.pub"
    for p in (key_path, pub_path):
        if p.exists():
            raise InvalidInputError(f"{p} exists; keys are never overwritten (pick another name)")
    private, public = generate_key()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    _write_new(key_path, pem, 0o600)
    try:
        _write_new(pub_path, (public.hex() + "\n").encode(), 0o644)
    except BaseException:
        key_path.unlink(missing_ok=True)
        raise
    return key_path, pub_path, key_id(public)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write a file that must not exist yet (keys are never overwritten)."""
    try:
        atomic_write_bytes(path, data, mode, exclusive=True)
    except FileExistsError:
        raise InvalidInputError(f"{path} exists; keys are never overwritten") from None


def load_private_key(path: str | Path) -> Any:
    """An ``Ed25519PrivateKey`` from a PKCS#8 PEM file written by ``write_key_pair``."""
    from cryptography.hazmat.primitives import serialization

    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"private key file {path} does not exist")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise InvalidInputError(f"{path} is not an unencrypted PEM private key ({err})") from None
    if not isinstance(key, _ed25519().Ed25519PrivateKey):
        raise InvalidInputError(f"{path} holds a {type(key).__name__}, not an ed25519 key")
    return key


def parse_public_key(spec: str) -> bytes:
    """A raw public key from 64 hex digits or from a ``.pub`` file holding them."""
    text = spec.strip()
    if len(text) != 2 * PUBLIC_KEY_BYTES or not _is_hex(text):
        path = Path(text)
        if not path.is_file():
            raise InvalidInputError(f"trusted key {spec[:80]!r} is neither 64 hex digits nor a "
                                    "public key file")
        text = path.read_text(errors="replace").strip()
        if len(text) != 2 * PUBLIC_KEY_BYTES or not _is_hex(text):
            raise InvalidInputError(f"{path} does not hold one ed25519 public key (64 hex "
                                    "digits); give the .pub file, not the .key")
    return bytes.fromhex(text)


def parse_trust(specs: str | Iterable[str]) -> tuple[bytes, ...]:
    """``--trust A,B --trust C`` (paths or hex keys) as raw public keys, in order, deduped."""
    items = [specs] if isinstance(specs, str) else list(specs)
    keys: list[bytes] = []
    for item in items:
        for part in str(item).split(","):
            if part.strip():
                key = parse_public_key(part)
                if key not in keys:
                    keys.append(key)
    return tuple(keys)


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


# ----------------------------------------------------------------------------- messages


def check_identity(msg: pb.Package) -> None:
    """``name``, ``version`` and ``signature`` of a message, or ``InvalidInputError``: a
    name is printable, without surrounding spaces, at most ``MAX_PACKAGE_NAME_CHARS``; a
    version is 1..``MAX_PACKAGE_VERSION`` with a name, 0 without; a signature has exact
    sizes and comes with a name (so that a signed package is always rollback-checked)."""
    name, version = msg.name, msg.version
    if name:
        if (len(name) > MAX_PACKAGE_NAME_CHARS or not name.isprintable()
                or name != name.strip()):
            raise InvalidInputError(f"package name {name[:80]!r} is too long (limit "
                                    f"{MAX_PACKAGE_NAME_CHARS}), not printable or padded")
        if not 1 <= version <= MAX_PACKAGE_VERSION:
            raise InvalidInputError(f"package version {version} must be within "
                                    f"1..{MAX_PACKAGE_VERSION}")
    elif version:
        raise InvalidInputError(f"package has version {version} but no name")
    if msg.HasField("signature"):
        sig = msg.signature
        if len(sig.public_key) != PUBLIC_KEY_BYTES or len(sig.signature) != SIGNATURE_BYTES:
            raise InvalidInputError(f"package signature holds a {len(sig.public_key)}-byte key "
                                    f"and {len(sig.signature)} signature bytes; ed25519 needs "
                                    f"{PUBLIC_KEY_BYTES} and {SIGNATURE_BYTES}")
        if not name:
            raise InvalidInputError("package is signed but has no name")


def open_package(data: bytes) -> tuple[bytes, pb.Package]:
    """``(message bytes, checked message)`` of a package (``codec.parse``'s checks plus
    ``check_identity``)."""
    raw = codec.decompress(data)
    msg = codec.parse_message(raw)
    check_identity(msg)
    return raw, msg


def _strip_field(raw: bytes, number: int) -> tuple[bytes, int]:
    """``raw`` (a serialized message) without the top-level records of field ``number``,
    and how many there were. Works on the wire format: nothing is re-serialized."""
    out, pos, found, n = bytearray(), 0, 0, len(raw)
    while pos < n:
        start = pos
        key, pos = _varint(raw, pos)
        wire_type, field = key & 7, key >> 3
        if wire_type == 0:
            _, pos = _varint(raw, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 2:
            length, pos = _varint(raw, pos)
            pos += length
        elif wire_type == 5:
            pos += 4
        else:  # groups (3, 4) are not in pnc's schema
            raise InvalidInputError(f"package message has wire type {wire_type}; not a pnc "
                                    "message")
        if pos > n:
            raise InvalidInputError("package message is truncated")
        if field == number:
            found += 1
        else:
            out += raw[start:pos]
    return bytes(out), found


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(raw) or shift > 63:
            raise InvalidInputError("package message has a bad varint")
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def signed_message(raw: bytes) -> bytes:
    """What the signature covers: the domain prefix and the message minus its signature."""
    unsigned, _ = _strip_field(raw, SIGNATURE_FIELD)
    return SIGNATURE_DOMAIN + unsigned


# ----------------------------------------------------------------------------- sign, verify


def sign(package_bytes: bytes, private_key: Any, name: str, version: int) -> bytes:
    """The package's bytes, named ``name``, at ``version``, signed by ``private_key`` (an
    ``Ed25519PrivateKey``). A signature it already carries is replaced (re-signing with a
    new key is how a publisher rotates)."""
    if not name:
        raise InvalidInputError("a signed package needs a name (--name)")
    if not 1 <= int(version) <= MAX_PACKAGE_VERSION:
        raise InvalidInputError(f"package version {version} must be within "
                                f"1..{MAX_PACKAGE_VERSION}")
    _, msg = open_package(package_bytes)
    msg.ClearField("signature")
    msg.name, msg.version = name, int(version)
    check_identity(msg)
    unsigned = msg.SerializeToString(deterministic=True)
    public = _raw_public(private_key)
    sig = pb.Signature(public_key=public, signature=private_key.sign(SIGNATURE_DOMAIN + unsigned))
    record = pb.Package(signature=sig).SerializeToString(deterministic=True)
    out = codec.compress(unsigned + record)
    if len(out) > codec.MAX_PACKAGE_BYTES:
        raise InvalidInputError(f"signed package is {len(out)} bytes; the limit is "
                                f"{codec.MAX_PACKAGE_BYTES}")
    return out


def signature_of(package_bytes: bytes) -> Verified | None:
    """The signature a package claims (checked against its bytes), None when unsigned.
    ``PermissionDeniedError`` for a signature that does not match (tampered bytes or a
    forged signature); whether the key is trusted is ``verify``'s question."""
    raw, msg = open_package(package_bytes)
    if not msg.HasField("signature"):
        return None
    unsigned, count = _strip_field(raw, SIGNATURE_FIELD)
    if count != 1:
        raise PermissionDeniedError(f"package carries {count} signature records; a signed "
                                    "package carries exactly one")
    ed25519 = _ed25519()
    public = bytes(msg.signature.public_key)
    from cryptography.exceptions import InvalidSignature

    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public).verify(
            bytes(msg.signature.signature), SIGNATURE_DOMAIN + unsigned)
    except (InvalidSignature, ValueError):
        raise PermissionDeniedError(f"package signature by key {key_id(public)} does not match "
                                    "its content: the package was altered after signing or the "
                                    "signature is forged") from None
    return Verified(key_id(public), public, msg.name, int(msg.version))


def verify(package_bytes: bytes, trusted_keys: Sequence[bytes] | Iterable[bytes]) -> Verified:
    """Who signed the package, when that is one of ``trusted_keys`` (raw public keys) and
    the signature matches; else ``PermissionDeniedError`` (unsigned, untrusted key, bad
    signature). ``InvalidInputError`` for bytes that are not a package."""
    trusted = {bytes(k) for k in trusted_keys}
    found = signature_of(package_bytes)
    if found is None:
        raise PermissionDeniedError("package is unsigned; only packages signed by a trusted key "
                                    "are accepted (`pnc sign`)")
    if found.public_key not in trusted:
        raise PermissionDeniedError(
            f"package is signed by key {found.key_id}, which is not trusted here (trusted: "
            f"{', '.join(sorted(key_id(k) for k in trusted)) or 'none'})")
    return found

"""Publisher keys and signatures: ``pnc keys generate``, ``pnc sign``, ``pnc verify``.

No torch: these work on package bytes (``pnc_net.signing``), so a publisher's
signing host needs neither the zoo nor the cloning stack (``docs/security.md``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pnc_cli.common import JsonOpt, show_result
from pnc_net.errors import NotFoundError

keys_app = typer.Typer(help="Publisher keys (ed25519) for signed packages.",
                       no_args_is_help=True)

TrustOpt = Annotated[list[str] | None, typer.Option(
    "--trust", help="Trusted public keys: .pub files or hex, comma separated or repeated.",
    show_default=False)]


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise NotFoundError(f"package file {path} does not exist")
    return path.read_bytes()


@keys_app.command("generate")
def keys_generate(
        name: Annotated[str, typer.Argument(help="Key name: writes NAME.key and NAME.pub.")],
        directory: Annotated[Path, typer.Option("--dir", help="Where to write them.")] = Path("."),
        json_out: JsonOpt = False) -> None:
    """Generate an ed25519 key pair: NAME.key (private, mode 0600) and NAME.pub (one line
    of hex, what receivers pass to --trust). Never overwrites a key."""
    from pnc_net.signing import write_key_pair

    key_path, pub_path, kid = write_key_pair(directory, name)
    info = {"key_id": kid, "private_key": str(key_path), "public_key": str(pub_path),
            "public_key_hex": pub_path.read_text().strip()}
    show_result(info, f"key {kid}  private {key_path} (keep it secret)  public {pub_path}",
                json_out)


def sign_cmd(package: Annotated[Path, typer.Argument(help="A .pnc package file.")],
             key: Annotated[Path, typer.Option("--key", help="Private key file (NAME.key).")],
             name: Annotated[str, typer.Option("--name", help="The package's name.")],
             version: Annotated[int, typer.Option("--version", help="Its version (>= 1; a "
                                                  "receiver refuses a lower one).")],
             out: Annotated[Path | None, typer.Option(
                 "--out", help="Where to write the signed package (default: replace PACKAGE).",
                 show_default=False)] = None,
             json_out: JsonOpt = False) -> None:
    """Name, version and sign a package; prints the signed package's new id."""
    from pnc_net.fsutil import atomic_write_bytes, sha256_bytes
    from pnc_net.signing import load_private_key, sign, signature_of

    data = _read(package)
    private = load_private_key(key)
    signed = sign(data, private, name, version)
    dest = out or package
    atomic_write_bytes(dest, signed)
    found = signature_of(signed)
    assert found is not None  # just signed
    info = {"id": sha256_bytes(signed), "previous_id": sha256_bytes(data), "out": str(dest),
            "name": name, "version": version, "key_id": found.key_id,
            "bytes": len(signed)}
    show_result(info, f"{info['id']}  {name} v{version}  signed by {info['key_id']}  -> {dest}",
                json_out)


def verify_cmd(package: Annotated[Path, typer.Argument(help="A .pnc package file.")],
               trust: TrustOpt = None, json_out: JsonOpt = False) -> None:
    """Check a package's signature: by a --trust key (exit 8 when unsigned, signed by
    another key or altered), or, without --trust, only that it matches its content."""
    from pnc_net.fsutil import sha256_bytes
    from pnc_net.signing import parse_trust, signature_of, verify

    data = _read(package)
    keys = parse_trust(trust or ())
    if keys:
        found = verify(data, keys)
    else:
        found = signature_of(data)
        if found is None:
            from pnc_net.errors import PermissionDeniedError

            raise PermissionDeniedError(f"package {package} is unsigned")
    info = {"id": sha256_bytes(data), "key_id": found.key_id, "name": found.name,
            "version": found.version, "trusted": bool(keys)}
    show_result(info, f"{info['id'][:16]}  {found.name} v{found.version}  signed by "
                f"{found.key_id}" + ("  (trusted)" if keys else "  (no --trust given)"),
                json_out)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.add_typer(keys_app, name="keys")
    app.command("sign")(sign_cmd)
    app.command("verify")(verify_cmd)

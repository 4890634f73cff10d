"""Transport commands: the two daemons and the edge client (send, fetch, predict, status)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from pnc_cli.common import JsonOpt, console, print_json
from pnc_net.errors import ExitCode, InvalidInputError, NotFoundError
from pnc_net.tables import table

receiver_app = typer.Typer(help="The receiver daemon.", no_args_is_help=True)
sender_app = typer.Typer(help="The sender daemon.", no_args_is_help=True)

TokenOpt = Annotated[str | None, typer.Option("--token", envvar="PNC_TOKEN",
                                              help="Bearer token (or $PNC_TOKEN).")]
CertOpt = Annotated[Path | None, typer.Option("--tls-cert", help="PEM certificate.")]
KeyOpt = Annotated[Path | None, typer.Option("--tls-key", help="PEM private key.")]
CaOpt = Annotated[Path | None, typer.Option(
    "--tls-ca", help="PEM CA: a client verifies the server with it; a server requires client "
    "certificates signed by it (mTLS).")]
#: ``pnc sender serve ARGS`` hands ARGS to the daemon's own parser (``SenderConfig.load``),
#: so the flags, their environment variables and ``--help`` are defined once, in its config.
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True,
                "help_option_names": []}


@receiver_app.command("serve", context_settings=PASS_THROUGH, add_help_option=False)
def receiver_serve(ctx: typer.Context) -> None:
    """Accept packages, rebuild and verify superbodies, serve Predict and Read (--help: all
    options)."""
    from receiver import main

    main(list(ctx.args))


@sender_app.command("serve", context_settings=PASS_THROUGH, add_help_option=False)
def sender_serve(ctx: typer.Context) -> None:
    """Serve the store, push new packages to every receiver, mirror the zoo (--help: all
    options)."""
    from sender import main

    main(list(ctx.args))


# ----------------------------------------------------------------------------- edge client


def _client(address: str, token, tls_ca, tls_cert, tls_key, timeout: float = 30.0):
    from pnc_net.serve.client import PncClient

    return PncClient(address, token, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
                     timeout_s=timeout)


def send_cmd(file: Annotated[Path, typer.Argument(help="A .pnc package file.")],
             to: Annotated[str, typer.Option("--to", help="Daemon HOST:PORT.")],
             token: TokenOpt = None, tls_ca: CaOpt = None, tls_cert: CertOpt = None,
             tls_key: KeyOpt = None, json_out: JsonOpt = False) -> None:
    """Send a package; prints its id (sha256 of the file) and the bytes sent."""
    if not file.is_file():
        raise NotFoundError(f"package file {file} does not exist")
    data = file.read_bytes()
    start = time.perf_counter()
    with _client(to, token, tls_ca, tls_cert, tls_key) as c:
        pid, sent = c.send_package(data)
        state = c.last_write.state if c.last_write else ""
        detail = c.last_write.detail if c.last_write else ""
    info = {"id": pid, "bytes_sent": sent, "package_bytes": len(data), "state": state,
            "detail": detail, "seconds": round(time.perf_counter() - start, 4), "to": to}
    if json_out:
        print_json(info)
    else:
        console.print(f"{pid}  {sent:,} bytes sent  state={state or '-'}"
                      + (f"  ({detail})" if detail else ""), highlight=False, soft_wrap=True)
    if state == "failed":
        raise typer.Exit(ExitCode.INTEGRITY)


def fetch_cmd(package_id: Annotated[str, typer.Argument(help="Package id or unique prefix.")],
              src: Annotated[str, typer.Option("--from", help="Daemon HOST:PORT.")],
              out: Annotated[Path, typer.Option("--out", help="Where to write the package.")],
              token: TokenOpt = None, tls_ca: CaOpt = None, tls_cert: CertOpt = None,
              tls_key: KeyOpt = None, json_out: JsonOpt = False) -> None:
    """Fetch a package by id (digest verified) and write it atomically."""
    from pnc_net.fsutil import atomic_write_bytes
    from pnc_net.serve.channel import check_digest  # torch-free (serve.store is not)

    check_digest(package_id, prefix_ok=True, what="package id")
    with _client(src, token, tls_ca, tls_cert, tls_key) as c:
        data = c.fetch_package(package_id)
    from pnc_net.fsutil import sha256_bytes

    atomic_write_bytes(out, data)
    info = {"id": sha256_bytes(data), "bytes": len(data), "out": str(out)}
    print_json(info) if json_out else console.print(
        f"{info['id']}  {len(data):,} bytes -> {out}", highlight=False, soft_wrap=True)


#: What ``--channels`` may ask a picture to be converted to (PIL modes).
PICTURE_MODES = {1: "L", 3: "RGB"}


def load_images(paths: list[Path], channels: int = 1) -> np.ndarray:
    """(N, C, H, W) float32 in [0, 1] from PNG (or other picture) and .npy files (each
    .npy may hold several images, used as they are). Pictures are converted to
    ``channels`` channels: 1 (grayscale) or 3 (RGB)."""
    from pnc_net.images import image_batch, picture_batch

    if channels not in PICTURE_MODES:
        raise InvalidInputError(f"--channels {channels}: use 1 (grayscale) or 3 (RGB)")
    arrays = []
    for p in paths:
        if not p.is_file():
            raise NotFoundError(f"image {p} does not exist")
        try:
            if p.suffix.lower() == ".npy":
                arr = image_batch(np.load(p, allow_pickle=False))
            else:
                from PIL import Image

                with Image.open(p) as img:
                    arr = picture_batch(np.asarray(img.convert(PICTURE_MODES[channels])))
        except Exception as err:  # noqa: BLE001 - PIL and numpy raise many kinds
            raise InvalidInputError(f"cannot read image {p}: {err}") from None
        arrays.append(arr)
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) != 1:
        raise InvalidInputError(f"images have different shapes {sorted(shapes)}")
    return np.concatenate(arrays)


def package_channels(client, package: str) -> int | None:
    """The channel count the package's models take, as the receiver reports it: the
    target's zoo manifest (its digest is the first of the record's ``zoo_refs``). None
    when the receiver does not say."""
    from pnc_net.images import channels_of

    info = client.stat(package)
    try:
        refs = json.loads(info.metadata_json or "{}").get("zoo_refs") or []
    except (ValueError, AttributeError):
        return None
    if not refs:
        return None
    try:
        return channels_of(client.zoo_manifest(refs[0]))
    except NotFoundError:
        return None


def predict_cmd(images: Annotated[list[Path], typer.Argument(help="PNG or .npy files.")],
                src: Annotated[str, typer.Option("--from", help="Receiver HOST:PORT.")],
                package: Annotated[str, typer.Option("--package", help="Package id/prefix.")],
                channels: Annotated[int | None, typer.Option(
                    "--channels", help="Convert pictures to 1 (grayscale) or 3 (RGB) "
                    "channels [default: what the package's models take, asked of the "
                    "receiver]; .npy files are sent as they are.")] = None,
                token: TokenOpt = None, tls_ca: CaOpt = None, tls_cert: CertOpt = None,
                tls_key: KeyOpt = None, json_out: JsonOpt = False) -> None:
    """Remote inference on the receiver's rebuilt superbody."""
    from pnc_net.serve.channel import check_digest  # torch-free (serve.store is not)

    check_digest(package, prefix_ok=True, what="package id")
    if channels is not None and channels not in PICTURE_MODES:
        raise InvalidInputError(f"--channels {channels}: use 1 (grayscale) or 3 (RGB)")
    missing = [p for p in images if not p.is_file()]
    if missing:
        raise NotFoundError(f"image {missing[0]} does not exist")
    pictures = any(p.suffix.lower() != ".npy" for p in images)
    x = load_images(images, channels or 1) if channels is not None or not pictures else None
    with _client(src, token, tls_ca, tls_cert, tls_key) as c:
        if x is None:  # pictures take the channels the package's models take
            x = load_images(images, package_channels(c, package) or 1)
        resp = c.predict(package, x)
    rows = [{"label": p.label, "probability": round(p.probability, 4)} for p in resp.predictions]
    if json_out:
        print_json({"package_id": resp.package_id, "predictions": rows})
        return
    for i, r in enumerate(rows):
        console.print(f"{i}: {r['label']}  (p={r['probability']:.3f})", highlight=False, soft_wrap=True)


def status_cmd(src: Annotated[str, typer.Option("--from", help="Daemon HOST:PORT.")],
               token: TokenOpt = None, tls_ca: CaOpt = None, tls_cert: CertOpt = None,
               tls_key: KeyOpt = None, json_out: JsonOpt = False) -> None:
    """Health and every package the daemon holds, with its state."""
    from google.protobuf.json_format import MessageToDict

    with _client(src, token, tls_ca, tls_cert, tls_key, timeout=10) as c:
        health = c.health()
        caps = c.capabilities()
        packages = c.list()
    if json_out:
        print_json({"health": health, "role": caps.role, "version": caps.pnc_version,
                    "packages": [MessageToDict(p, preserving_proto_field_name=True,
                                               always_print_fields_with_no_presence=True)
                                 for p in packages]})
        return
    console.print(f"{src}: {caps.role} pnc {caps.pnc_version}, health {health}, "
                  f"{len(packages)} packages", highlight=False, soft_wrap=True)
    console.print(table(("id", "name", "bytes", "state", "target", "labels", "fp error",
                         "detail"), [
        (p.id[:12], _published_as(p.metadata_json), f"{p.size_bytes:,}", p.state, p.target,
         ",".join(p.label_names), f"{p.fingerprint_error:.4f}", p.detail) for p in packages]))


def _published_as(metadata_json: str) -> str:
    """``name vN (signer key id)`` of a named package, ``-`` for an unnamed one."""
    try:
        meta = json.loads(metadata_json or "{}")
    except ValueError:
        return "-"
    if not isinstance(meta, dict) or not meta.get("name"):
        return "-"
    signer = f" ({meta['signer']})" if meta.get("signer") else ""
    return f"{meta['name']} v{meta.get('version', '?')}{signer}"


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.add_typer(receiver_app, name="receiver")
    app.add_typer(sender_app, name="sender")
    app.command("send")(send_cmd)
    app.command("fetch")(fetch_cmd)
    app.command("predict")(predict_cmd)
    app.command("status")(status_cmd)


# ----------------------------------------------------------------------------- pnc demo


def demo_transfer(package_path: Path, zoo_dir: Path | None) -> dict:
    """Start a receiver on 127.0.0.1 (its own process), send the package through a byte
    meter, wait until it is verified, ask for predictions on a few test digits, stop it.

    Returns ``wire_bytes`` (the send, both directions, all framing; the connection's
    setup is ``connection_setup_bytes``), ``package_bytes``,
    ``superbody_bytes`` (from the package's report, when it has one),
    ``send_to_verified_s``, ``state``, ``fingerprint_error`` and ``predictions``.
    """
    import shutil
    import tempfile

    from pnc_cli.daemons import spawn_daemon, stop_daemon
    from pnc_net import wire
    from pnc_net.data import load_mnist
    from pnc_net.serve.client import PncClient
    from pnc_net.serve.wiremeter import WireMeter
    from pnc_net.zoo import default_zoo_dir

    package, data = wire.read_package(package_path)
    store = Path(tempfile.mkdtemp(prefix="pnc-demo-receiver-"))
    zoo = Path(zoo_dir) if zoo_dir else default_zoo_dir()
    proc, port = spawn_daemon("receiver", ["--listen", "127.0.0.1:0", "--zoo", str(zoo),
                                           "--store", str(store)])
    try:
        with WireMeter(port) as meter, PncClient(meter.address) as c:
            c.wait_ready(30)
            c.health()
            setup = meter.total  # HTTP/2 connection setup and a health check
            start = time.perf_counter()
            pid, _ = c.send_package(data)
            elapsed = time.perf_counter() - start
            wire_bytes = meter.total - setup  # both directions, framing and headers included
            info = c.stat(pid)
            digits = load_mnist()
            labels = list(package.label_names)
            pick = [int((digits.y_test == digits.label_names.index(n)).nonzero()[0])
                    for n in labels if n in digits.label_names][:8]
            resp = c.predict(pid, digits.x_test[pick])
            truth = [digits.label_names[int(digits.y_test[i])] for i in pick]
    finally:
        stop_daemon(proc)
        shutil.rmtree(store, ignore_errors=True)
    return {"package_id": pid, "package_bytes": len(data), "wire_bytes": wire_bytes,
            "connection_setup_bytes": setup,
            "superbody_bytes": package.report.get("metrics", {}).get("superbody_bytes"),
            "send_to_verified_s": round(elapsed, 4), "state": info.state,
            "fingerprint_error": info.fingerprint_error,
            "predictions": [{"true": t, "predicted": p.label,
                             "probability": round(p.probability, 4)}
                            for t, p in zip(truth, resp.predictions)]}

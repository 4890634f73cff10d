"""``pnc predict`` on picture files: converted to the channels the package's models take
(asked of the receiver, or ``--channels``), so an RGB model can be asked from the CLI
and a grayscale one still gets grayscale; the loader itself; and the edge client stays
torch-free on this path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_light_client import UNREACHABLE, run_fresh

from pnc_cli.net import load_images
from pnc_net.errors import ExitCode, InvalidInputError
from pnc_net.images import channels_of, picture_batch
from pnc_net.testing import two_cnn_package
from pnc_net.zoo import Zoo

RGB, GRAY = (3, 32, 32), (1, 32, 32)
TOKEN = "pictures-token"


def _rgb_png(path: Path, seed: int = 0) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    return pixels


# ----------------------------------------------------------------------------- the loader


def test_picture_batch_is_channels_first():
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)  # (H, W, C)
    got = picture_batch(rgb)
    assert got.shape == (1, 3, 2, 3) and got.dtype == np.float32
    np.testing.assert_array_equal(got[0, 1], rgb[:, :, 1].astype(np.float32) / np.float32(255))
    assert picture_batch(np.zeros((4, 5), np.uint8)).shape == (1, 1, 4, 5)
    with pytest.raises(InvalidInputError, match="picture"):
        picture_batch(np.zeros((1, 2, 3, 4)))


def test_channels_of_a_manifest():
    assert channels_of(json.dumps({"input_shape": [3, 32, 32]})) == 3
    assert channels_of(json.dumps({"input_shape": [1, 28, 28]})) == 1
    assert channels_of("not json") is None and channels_of("[]") is None
    assert channels_of(json.dumps({"name": "x"})) is None


def test_load_images_in_colour_and_in_grayscale(tmp_path):
    png = tmp_path / "rgb.png"
    pixels = _rgb_png(png)
    colour = load_images([png], channels=3)
    assert colour.shape == (1, *RGB)
    np.testing.assert_array_equal(colour[0], pixels.transpose(2, 0, 1) / np.float32(255))
    gray = load_images([png], channels=1)
    want = np.asarray(Image.open(png).convert("L"), np.float32) / 255
    assert gray.shape == (1, *GRAY)
    np.testing.assert_array_equal(gray[0, 0], want)
    gray_png = tmp_path / "gray.png"
    Image.fromarray((want * 255).astype(np.uint8), "L").save(gray_png)
    three = load_images([gray_png], channels=3)  # a grayscale picture for an RGB model
    assert three.shape == (1, *RGB) and (three[0] == three[0, :1]).all()
    npy = tmp_path / "x.npy"
    np.save(npy, np.zeros((2, *RGB), np.float32))
    assert load_images([npy, png], channels=3).shape == (3, *RGB)  # .npy as it is
    with pytest.raises(InvalidInputError, match="different shapes"):
        load_images([npy, png], channels=1)
    with pytest.raises(InvalidInputError, match="--channels 2"):
        load_images([png], channels=2)


def test_predict_on_a_picture_is_light(tmp_path):
    """The picture path asks the receiver for the package's channels first: still no
    torch; it gets as far as dialling."""
    png = tmp_path / "rgb.png"
    _rgb_png(png)
    got = run_fresh(["predict", "--from", UNREACHABLE, "--package", "abcd", str(png)])
    assert got["rc"] == ExitCode.REMOTE and got["heavy"] == [], got


# ----------------------------------------------------------------------------- a real receiver


def _cli_predict(addr: str, pid: str, *args: str) -> subprocess.CompletedProcess:
    cli = [sys.executable, "-c", "import pnc_cli; pnc_cli.main()"]
    return subprocess.run([*cli, "predict", "--from", addr, "--package", pid[:12], *args,
                           "--json"], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PNC_TOKEN": TOKEN})


def _rows(resp) -> list[tuple[str, float]]:
    return [(p.label, round(p.probability, 4)) for p in resp.predictions]


@pytest.mark.grpc
def test_pnc_predict_pictures_against_rgb_and_grayscale_packages(tmp_path):
    from pnc_cli.daemons import spawn_daemon, stop_daemon
    from pnc_net.serve.client import PncClient

    zoo = Zoo(tmp_path / "zoo")
    rgb_data = two_cnn_package(zoo, RGB, ("rgb-t", "rgb-s"), 0)
    gray_data = two_cnn_package(zoo, GRAY, ("gray-t", "gray-s"), 1)
    pngs = [tmp_path / f"rgb{i}.png" for i in range(2)]
    pixels = np.stack([_rgb_png(p, i) for i, p in enumerate(pngs)])  # (2, H, W, 3)
    proc, port = spawn_daemon("receiver", ["--listen", "127.0.0.1:0", "--zoo",
                                           str(tmp_path / "zoo"), "--store",
                                           str(tmp_path / "store"), "--read-token", TOKEN,
                                           "--token", "publisher-token"])
    addr = f"127.0.0.1:{port}"
    try:
        with PncClient(addr, "publisher-token") as c:
            rgb_id, _ = c.send_package(rgb_data)
            assert c.last_write.state == "verified", c.last_write.detail
            gray_id, _ = c.send_package(gray_data)
            assert c.last_write.state == "verified", c.last_write.detail
            x = pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255  # the tensors themselves
            want_rgb = _rows(c.predict(rgb_id, x))
            gray = np.stack([np.asarray(Image.open(p).convert("L")) for p in pngs])
            want_gray = _rows(c.predict(gray_id, gray[:, None].astype(np.float32) / 255))
        # an RGB package: the pictures go in colour, the answers are the tensors' answers
        r = _cli_predict(addr, rgb_id, *map(str, pngs))
        assert r.returncode == 0, r.stderr
        got = [(p["label"], p["probability"]) for p in json.loads(r.stdout)["predictions"]]
        assert got == want_rgb
        # a grayscale package: the same pictures in grayscale, as before
        r = _cli_predict(addr, gray_id, *map(str, pngs))
        assert r.returncode == 0, r.stderr
        got = [(p["label"], p["probability"]) for p in json.loads(r.stdout)["predictions"]]
        assert got == want_gray
        # --channels overrides what the receiver says; a wrong one is refused by shape
        r = _cli_predict(addr, rgb_id, str(pngs[0]), "--channels", "3")
        assert r.returncode == 0 and json.loads(r.stdout)["predictions"][0]["label"] == \
            want_rgb[0][0], r.stderr
        r = _cli_predict(addr, rgb_id, str(pngs[0]), "--channels", "1")
        assert r.returncode == ExitCode.INCOMPATIBLE and "(3, 32, 32)" in r.stderr, r.stderr
        r = _cli_predict(addr, rgb_id, str(pngs[0]), "--channels", "2")
        assert r.returncode == ExitCode.INVALID_INPUT and "--channels 2" in r.stderr, r.stderr
    finally:
        stop_daemon(proc)

"""``pnc --help`` and the edge client (send, fetch, status, predict) load neither
torch nor ray: each runs in a fresh interpreter that then lists what it imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pnc_net.errors import ExitCode

UNREACHABLE = "127.0.0.1:9"
PACKAGE = Path(__file__).parent / "data" / "package_v1_fp16.pnc"
HEAVY = ("torch", "ray")

# Runs `pnc ARGV` as main() does, then prints its exit code and the heavy modules loaded.
SCRIPT = f"""
import json, sys
sys.argv = ["pnc", *json.loads(sys.argv[1])]
import pnc_cli
try:
    pnc_cli.main()
    rc = 0
except SystemExit as exit_:
    rc = exit_.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
print(json.dumps({{"rc": rc, "heavy": heavy}}))
"""


def run_fresh(args: list[str]) -> dict:
    res = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(args)], capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "digits.npy"
    np.save(path, np.zeros((2, 28, 28), np.float32))
    return path


COMMANDS = {
    "send": ["send", str(PACKAGE), "--to", UNREACHABLE],
    "fetch": ["fetch", "abcd", "--from", UNREACHABLE, "--out", "never-written.pnc"],
    "status": ["status", "--from", UNREACHABLE],
    "predict": ["predict", "--from", UNREACHABLE, "--package", "abcd", "{images}"],
}


@pytest.mark.parametrize("args", [["--help"]] + [[name, "--help"] for name in COMMANDS],
                         ids=lambda a: " ".join(a))
def test_help_is_light(args):
    got = run_fresh(args)
    assert got == {"rc": ExitCode.OK, "heavy": []}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_edge_client_is_light(name, images, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # fetch must write nothing; if it did, not into the repo
    args = [str(images) if a == "{images}" else a for a in COMMANDS[name]]
    got = run_fresh(args)
    assert got["rc"] == ExitCode.REMOTE, got  # it got as far as dialling the daemon
    assert got["heavy"] == []


def test_the_client_module_is_light():
    code = ("import sys, pnc_net.serve.client; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert res.stdout.strip() == "[]"

"""Usage mistakes through the real console script: click's usage line, its
suggestion and exit code 2 — never a traceback. And ``--ray``'s optional value,
parsed without starting Ray."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from pnc_cli import app
from pnc_cli.common import RAY_LOCAL, fill_optional_values
from pnc_net.errors import ExitCode

_BIN = Path(sys.executable).parent / "pnc"
PNC = str(_BIN) if _BIN.exists() else shutil.which("pnc")

# arguments -> fragments stderr must hold
USAGE_MISTAKES = {
    "unknown command": (["clon"], ["Usage: pnc ", "No such command 'clon'",
                                   "Did you mean 'clone'?"]),
    "unknown option": (["clone", "--bogus", "1"], ["Usage: pnc clone ",
                                                   "No such option: --bogus"]),
    "unknown subcommand": (["zoo", "lst"], ["Usage: pnc zoo ", "No such command 'lst'",
                                            "Did you mean 'list'?"]),
    "missing argument": (["eval"], ["Usage: pnc eval ", "Missing argument"]),
}


@pytest.mark.skipif(PNC is None, reason="the pnc console script is not installed")
@pytest.mark.parametrize("case", list(USAGE_MISTAKES))
def test_usage_mistake_is_a_usage_error(case):
    args, fragments = USAGE_MISTAKES[case]
    env = {**os.environ, "COLUMNS": "100"}
    res = subprocess.run([PNC, *args], capture_output=True, text=True, env=env, timeout=120,
                         check=False)
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode == ExitCode.INVALID_INPUT == 2, res.stderr
    for fragment in fragments:
        assert fragment in res.stderr, f"{fragment!r} not in:\n{res.stderr}"
    assert res.stdout == ""


CLONE = ["clone", "--target", "mnist-cnn-0to4", "--source", "mnist-cnn-5to9", "--classes", "5,6"]


def parse(*args: str) -> dict:
    """The parameters ``pnc ARGS`` would call its command with; runs nothing."""
    group = typer.main.get_command(app)
    parent = group.make_context("pnc", list(args))
    name, *rest = args
    return group.get_command(parent, name).make_context(name, rest, parent=parent).params


@pytest.mark.parametrize("extra, ray", [
    ([], None),
    (["--ray"], RAY_LOCAL),
    (["--ray", "--json"], RAY_LOCAL),
    (["--ray", "--seed", "3"], RAY_LOCAL),
    (["--ray", "HEAD:6379"], "HEAD:6379"),
    (["--ray=HEAD:6379"], "HEAD:6379"),
])
def test_ray_value_is_optional(extra, ray):
    params = parse(*CLONE, *extra)
    assert params["ray"] == ray
    assert params["classes"] == ["5,6"]


def test_bare_ray_does_not_eat_the_next_option():
    params = parse(*CLONE[:1], "--ray", *CLONE[1:], "--json")
    assert params["ray"] == RAY_LOCAL and params["json_out"] is True
    assert params["target"] == "mnist-cnn-0to4"


def test_demo_ray_stays_a_switch():
    """The old argv rewrite turned ``pnc demo --ray`` into ``--ray local``, an error."""
    assert parse("demo", "--ray")["use_ray"] is True
    assert parse("demo", "--no-ray")["use_ray"] is False


def test_nothing_after_double_dash_is_filled():
    assert fill_optional_values(["--ray", "--", "--ray"], {"--ray": "x"}) == [
        "--ray", "x", "--", "--ray"]

"""The ``pnc`` command line. Each concern registers its commands from its own module."""

from __future__ import annotations

import os
import sys

import typer

from pnc_cli import bench, core, jobs, net
from pnc_cli.common import run_guarded

app = typer.Typer(
    name="pnc",
    help="Partial network cloning: give a zoo model new classes by shipping <masks, R, adapter>.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for module in (core, net, jobs, bench):
    module.register(app)


def optional_flag_values(argv: list[str], flag: str, default: str) -> list[str]:
    """Let ``--ray`` stand alone: click options need a value, so a bare ``--ray``
    (last, or followed by another option) gets ``default``."""
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == flag and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out.append(default)
    return out


def main() -> None:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from pnc_cli.core import RAY_LOCAL

    sys.argv[1:] = optional_flag_values(sys.argv[1:], "--ray", RAY_LOCAL)
    sys.exit(run_guarded(app))

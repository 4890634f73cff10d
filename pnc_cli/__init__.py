"""The ``pnc`` command line. Each concern registers its commands from its own module.

Importing this package loads no torch and no ray: each command imports what it
runs, so ``pnc --help`` and the edge client (send, fetch, status, predict) start fast.
"""

from __future__ import annotations

import os
import sys

import typer

from pnc_cli import bench, core, demo, jobs, keys, net
from pnc_cli.common import run_guarded

app = typer.Typer(
    name="pnc",
    help="Partial network cloning: give a zoo model new classes by shipping <masks, R, adapter>.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for module in (core, demo, net, jobs, bench, keys):
    module.register(app)


def main() -> None:
    """The console script: exit with the code ``run_guarded`` settles on."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    sys.exit(run_guarded(app))

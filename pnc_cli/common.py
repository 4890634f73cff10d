"""What every command shares: error handling, JSON output, the zoo option."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pnc_net.errors import PncError

console = Console(stderr=False)
err_console = Console(stderr=True)

ZooOpt = Annotated[Path | None, typer.Option(
    "--zoo", help="Zoo folder (default: $PNC_ZOO or ~/.cache/pnc/zoo).", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object for scripts.")]


def run_guarded(app: typer.Typer) -> int:
    """Run the app; a ``PncError`` becomes one line on stderr and its exit code."""
    try:
        # Without standalone mode, click *returns* the code of a ``typer.Exit`` raised
        # inside a command (``pnc zoo verify`` uses 4) instead of raising it.
        rc = app(standalone_mode=False)
    except PncError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        return err.exit_code
    except typer.Exit as exit_:
        return exit_.exit_code
    except typer.Abort:
        err_console.print("aborted")
        return 130
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except OSError as err:  # a path the user named: unwritable, not a folder, disk full...
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        return 1
    except Exception as err:  # click usage errors
        import click

        if isinstance(err, click.ClickException):
            err.show()
            return err.exit_code
        raise
    return rc if isinstance(rc, int) and not isinstance(rc, bool) else 0


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=None, sort_keys=True, default=float) + "\n")
    sys.stdout.flush()

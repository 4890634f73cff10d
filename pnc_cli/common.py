"""What every command shares: error handling, JSON output, the zoo option.

This module is imported for every ``pnc`` invocation, ``pnc --help`` included, so
it must stay light: no torch, no ray, nothing from ``pnc_net`` that imports them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperCommand

from pnc_net.errors import ExitCode, InvalidInputError, PncError

console = Console(stderr=False)
err_console = Console(stderr=True)

ZooOpt = Annotated[Path | None, typer.Option(
    "--zoo", help="Zoo folder (default: $PNC_ZOO or ~/.cache/pnc/zoo).", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object for scripts.")]
DeviceOpt = Annotated[str, typer.Option(
    "--device", metavar="auto|cpu|cuda[:N]",
    help="Where models compute. cpu (default) gives bit-reproducible results: the same "
         "seed gives the same package on every CPU run. auto takes the first GPU when one "
         "is visible, else the CPU; cuda[:N] insists on GPU N (an error without one). "
         "A GPU run gives a package that differs from the CPU one in the last bits.")]
PrecisionOpt = Annotated[str, typer.Option(
    "--precision", metavar="fp32|bf16",
    help="fp32 (default), or bf16 autocast of the forward passes without gradients "
         "(CUDA only; not yet checked against the fingerprint tolerance).")]

#: The metrics ``pnc clone``, ``pnc eval`` and ``pnc demo`` report, in this order.
METRIC_KEYS = ("acc_old", "acc_new", "acc_all", "locality", "target_acc_old", "source_acc_new")
#: The gap decomposition (``pnc_net.metrics.gap_decomposition``) reported beside them.
GAP_KEYS = ("routing_error_old", "routing_error_new", "branch_error_new", "oracle_acc_old",
            "oracle_acc_new")
#: What a bare ``--ray`` (no address) means: start a local cluster or join $RAY_ADDRESS.
RAY_LOCAL = "local"


def split_labels(text: str) -> tuple[str, ...]:
    """``--classes 5,6`` as label names; an empty list is a mistake, not "no classes"."""
    labels = tuple(c.strip() for c in text.split(",") if c.strip())
    if not labels:
        raise InvalidInputError(f"--classes {text!r} names no class; give e.g. --classes 5,6")
    return labels


def run_guarded(app: typer.Typer) -> int:
    """Run the app; a ``PncError`` becomes one line on stderr and its exit code, a usage
    mistake click's usage line, its suggestion and exit code 2."""
    try:
        # Without standalone mode, click *returns* the code of a ``typer.Exit`` raised
        # inside a command (``pnc zoo verify`` uses 4) instead of raising it.
        rc = app(standalone_mode=False)
    except PncError as err:
        return report(err, err.exit_code)
    except typer.Exit as exit_:
        return exit_.exit_code
    except typer.TyperException as err:
        return show_usage_error(err)
    except typer.Abort:
        err_console.print("aborted")
        return ExitCode.INTERRUPTED
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return ExitCode.INTERRUPTED
    except OSError as err:  # a path the user named: unwritable, not a folder, disk full...
        return report(err, ExitCode.FAILURE)
    return rc if isinstance(rc, int) and not isinstance(rc, bool) else ExitCode.OK


def report(err: BaseException, code: int) -> int:
    """One line on stderr; returns ``code`` so callers can ``return report(...)``."""
    err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
    return code


def show_usage_error(err: typer.TyperException) -> int:
    """Typer 0.2x vendors click as ``typer._click``: its ``ClickException`` (an unknown
    command or option, a missing argument) derives from the public ``TyperException``,
    not from ``click.ClickException``. Its ``show`` prints the usage line and the
    "Did you mean" hint."""
    show = getattr(err, "show", None)
    if show is not None:
        show()
    else:
        err_console.print(f"error: {err.format_message()}", highlight=False, soft_wrap=True)
    return err.exit_code


def optional_value_command(values: dict[str, str]) -> type[TyperCommand]:
    """A command class whose options in ``values`` may stand alone.

    ``pnc clone --ray`` (last, or followed by another option) means ``--ray local``
    and ``--ray HEAD:6379`` an address. Click 8 spells this ``is_flag=False,
    flag_value=...``, but typer 0.2x's vendored parser has no optional values (it
    ignores ``flag_value`` and warns that it is unsupported), so the command fills
    the value in before its own parser runs, for its own options only, through the
    ``cls=`` hook typer offers for custom commands.
    """

    class OptionalValueCommand(TyperCommand):
        def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
            return super().parse_args(ctx, fill_optional_values(args, values))

    return OptionalValueCommand


def fill_optional_values(args: Sequence[str], values: dict[str, str]) -> list[str]:
    """``args`` with ``values[opt]`` after each bare ``opt`` (none after ``--``)."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + list(args[i:])
        out.append(arg)
        if arg in values and (i + 1 == len(args) or args[i + 1].startswith("-")):
            out.append(values[arg])
    return out


def print_json(obj: Any) -> None:
    """One JSON object on one line of stdout (what ``--json`` prints)."""
    sys.stdout.write(json.dumps(obj, indent=None, sort_keys=True, default=float) + "\n")
    sys.stdout.flush()


def show_result(info: dict, line: str, json_out: bool) -> None:
    """A command's result: ``info`` as JSON with ``--json``, else ``line`` for people."""
    if json_out:
        print_json(info)
    else:
        console.print(line, highlight=False, soft_wrap=True)

"""Tables for people: the one way pnc lays out rows, in the CLI and in job logs.

``table(columns, rows)`` builds a ``rich`` table (the CLI prints it);
``render(columns, rows)`` gives the same table as plain text, for a Ray job's
log or any stream that is not a terminal.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence

from rich.console import Console
from rich.table import Table


def table(columns: Sequence[str], rows: Iterable[Sequence[object]],
          title: str | None = None) -> Table:
    """A rich ``Table`` with one column per name and ``str()`` of every cell."""
    out = Table(title=title)
    for name in columns:
        out.add_column(name)
    for row in rows:
        out.add_row(*(str(v) for v in row))
    return out


def render(columns: Sequence[str], rows: Iterable[Sequence[object]], width: int = 160) -> str:
    """The table as plain text (no colour, no terminal needed)."""
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, highlight=False).print(
        table(columns, rows))
    return buf.getvalue().rstrip("\n")

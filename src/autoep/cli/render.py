"""Tables for the terminal: rich when installed, plain aligned text otherwise."""

from __future__ import annotations

from collections.abc import Sequence


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        table = [tuple(headers), *map(tuple, rows)]
        widths = [max(len(r[i]) for r in table) for i in range(len(headers))]
        print(title)
        for row in table:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        return
    table = Table(title=title, title_justify="left")
    for header in headers:
        table.add_column(header)
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # piped or captured: do not wrap at 80 columns
        console = Console(width=200)
    console.print(table)

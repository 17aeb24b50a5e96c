"""Console output shared by every command: tables that keep their width in logs."""
from __future__ import annotations

from rich.console import Console
from rich.segment import Segments
from rich.table import Table


def print_table(console: Console, table: Table) -> None:
    """Print at the table's natural width when the output is not a terminal (a log, a file), where rich would
    squeeze it into 80 columns and truncate the cells."""
    if console.is_terminal:
        console.print(table)
        return
    natural = console.measure(table, options=console.options.update_width(10_000)).maximum
    options = console.options.update_width(max(console.width, natural))
    console.print(Segments(console.render(table, options)), crop=False)

"""The rich consoles and progress bars every stage shares: results to stdout, chatter to stderr."""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

out = Console()
err = Console(stderr=True)


def quiet() -> bool:
    return os.environ.get("BIRDS_QUIET") == "1"


def progress(*extra_columns: object, transient: bool = False) -> Progress:
    """A progress bar on stderr."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        *extra_columns,
    ]
    # Off where a bar would only leave blank lines behind (pipes, CI logs) and with --quiet.
    disable = quiet() or not err.is_terminal
    return Progress(*columns, console=err, transient=transient, disable=disable)  # type: ignore[arg-type]


def info(message: str) -> None:
    if not quiet():
        err.print(message, highlight=False)


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {message}", highlight=False)

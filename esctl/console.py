"""What every `esctl` command shares: the consoles, one-line errors, argument checks."""

from __future__ import annotations

import typer
from rich.console import Console

from esctl import stack

out = Console()
err = Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print a one-line error; raise the returned Exit to leave with `code`."""
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def require_dependencies() -> None:
    problems = stack.dependency_problems()
    if problems:
        for line in problems:
            err.print(f"[red]error:[/red] {line}", highlight=False)
        raise typer.Exit(2)


def choose(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise fail(f"unknown {what} {value!r}; expected one of: {', '.join(allowed)}")
    return value

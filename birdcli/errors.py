"""The one user-facing error type: `main()` prints it as a single line and exits with its code."""

from __future__ import annotations


class BirdsError(Exception):
    """Something the user can fix; `hint` says how. Exit code 1 unless it is a usage/config error."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(BirdsError):
    """Bad command line or configuration (exit code 2)."""

    exit_code = 2

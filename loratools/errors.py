"""The few exception types loratools raises on purpose.

Every message says what is wrong, where (file, key) and, when there is one, the fix. The CLI
catches ``LoratoolsError`` once, prints its message on one line and exits with ``exit_code``;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class LoratoolsError(Exception):
    """Base class: an expected failure the user can act on (exit code 2)."""

    exit_code = 2

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)


class InvalidFileError(LoratoolsError):
    """A file is missing, unreadable, truncated or not in the format it claims."""


class UsageError(LoratoolsError):
    """Arguments that contradict each other or name something that does not exist."""


class ArchitectureMismatchError(LoratoolsError):
    """An adapter and a base model belong to different architectures, or one is unknown."""


class UnmatchedModulesError(LoratoolsError):
    """Adapter modules that map to no base weight, when the user did not allow that."""

    def __init__(self, message: str, unmatched: list[str], *, path: str | Path | None = None) -> None:
        self.unmatched = unmatched
        super().__init__(message, path=path)


class NonFiniteError(LoratoolsError):
    """A computed tensor holds NaN or Inf; nothing is written."""


class OutputExistsError(LoratoolsError):
    """The output exists (or is an input) and ``--overwrite`` was not given."""

"""The few exception types loratools raises on purpose.

Every message says what is wrong, where (file, key) and, when there is one, the fix. The CLI
catches ``LoratoolsError`` once, prints its message on one line and exits with ``exit_code``;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import signal
from pathlib import Path


def _worker_message(message: str) -> str:
    """The original one-line message of an error re-raised by a torch DataLoader worker.

    torch rebuilds a worker's exception in the main process as ``type("Caught X in DataLoader
    worker process 0.\\nOriginal Traceback ...\\nmodule.X: <message>")``; the user should see only
    ``<message>``, which already names the file.
    """
    if not message.startswith("Caught ") or "\nOriginal Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    head, sep, rest = last.partition(": ")
    return rest if sep and head.rsplit(".", 1)[-1].endswith(("Error", "Exception")) else last


class LoratoolsError(Exception):
    """Base class: an expected failure the user can act on (exit code 2)."""

    exit_code = 2

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        self.path = str(path) if path is not None else None
        message = _worker_message(message)
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
    """A tensor read or computed holds NaN or Inf; nothing is written."""


class OutputExistsError(LoratoolsError):
    """The output exists (or is an input) and ``--overwrite`` was not given."""


class OutputBusyError(OutputExistsError):
    """Another process is writing the same output right now (it holds the output's temporary file)."""


class WriteError(LoratoolsError):
    """Writing an output failed for a reason of the machine (a full disk, an I/O error); nothing was left."""


class DiskFullError(WriteError):
    """The output's folder has less free space than the output needs."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so that every ``finally`` and cleanup runs the same way.

    A ``KeyboardInterrupt`` subclass on purpose: code that already cleans up after Ctrl-C (temporary
    files, temporary folders) needs nothing new for ``timeout``, job schedulers or a closed terminal.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

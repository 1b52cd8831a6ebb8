"""What went wrong with a path, in the words of a one-line error.

The operating system answers "Errno 40" or raises from deep inside ``pathlib``; the user needs
"symbolic link loop" next to the file name. Every reader and the writer go through here, so one
kind of failure reads the same in every command.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

_WORDS = {
    errno.ENOENT: "file not found",
    errno.ELOOP: "symbolic link loop (the link points back to itself through other links); fix or remove the link",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EISDIR: "is a directory, not a file",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.ENAMETOOLONG: "file name too long",
    errno.EIO: "input/output error (a failing disk or a dropped network share)",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.EMFILE: "too many open files",
    errno.EFBIG: "file too large for this file system (FAT32 holds at most 4 GiB per file)",
}


def os_problem(exc: OSError, path: str | Path | None = None) -> str:
    """``exc`` as a short phrase (no errno numbers, no Python class names).

    A missing file that is really a dangling or looping symbolic link says so, because "not found"
    next to a name that ``ls`` lists is confusing.
    """
    if exc.errno == errno.ENOENT and path is not None:
        return missing_reason(Path(path))
    words = _WORDS.get(exc.errno or -1)
    if words is not None:
        return words
    return (exc.strerror or str(exc)).rstrip(".").lower() or type(exc).__name__


def missing_reason(path: Path) -> str:
    """Why ``path`` cannot be opened although it was named: not there, a dangling link, or a link loop."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return _WORDS[errno.ELOOP]
    else:
        return "file not found"  # it is there now: it vanished and came back, say what was seen
    if path.is_symlink():
        try:
            target = os.readlink(path)
        except OSError:
            return "broken symbolic link"
        return f"broken symbolic link (points to {target}, which does not exist)"
    return "file not found"

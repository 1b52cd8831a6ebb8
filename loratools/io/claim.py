"""Claiming an output file while it is written: one recognisable temporary file, held under a lock.

Every output is written to ``.<name>.loratools-partial`` in the output's folder and renamed onto
the final name only when complete. That temporary file is also the claim on the output: the
writer holds an exclusive ``flock`` on it for as long as it writes, so

- a second writer of the same output finds it locked and stops at once, before any work, with
  "being written by another process" (instead of both finishing and the later one silently
  replacing the earlier one);
- a temporary file that nobody holds is stale (its writer was killed with SIGKILL, or the machine
  lost power: no ``finally`` ran), and the next run for that output removes it;
- the lock needs no bookkeeping: the kernel drops it when the process dies, however it dies.

The final name is taken with ``os.link`` when the caller may not overwrite, which fails if the name
exists: a file that appeared meanwhile (another tool, another machine on a share) is never
replaced. Where links are unsupported (FAT, some network shares) the check-then-rename fallback
leaves a window of a few microseconds.

Without ``fcntl`` (Windows) the temporary file is created exclusively instead; a stale one can be
deleted (no process has it open) and a live one cannot, which gives the same three answers.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from loratools.errors import OutputBusyError, OutputExistsError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

#: The suffix of every temporary output file; nothing else in loratools ends this way.
TEMP_SUFFIX = ".loratools-partial"
_FLAGS = os.O_RDWR | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)


def temp_path(out: Path) -> Path:
    """The temporary file that holds ``out`` while it is written (hidden, next to it)."""
    return out.parent / f".{out.name}{TEMP_SUFFIX}"


def _busy(out: Path) -> OutputBusyError:
    return OutputBusyError(f"being written by another process right now (it holds {temp_path(out).name}); "
                           "wait for it to finish or choose another output", path=out)


def _same_inode(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


class Claim:
    """The temporary file of one output, open and locked; ``fd`` is positioned at 0 and empty.

    Either ``finish`` (rename onto the output) or ``abandon`` (remove it) must follow; both
    release the claim.
    """

    def __init__(self, out: Path, fd: int) -> None:
        self.out = out
        self.path = temp_path(out)
        self.fd = fd

    def finish(self, *, overwrite: bool) -> None:
        """Give the written temporary file the output's name; refuse an output that appeared meanwhile."""
        try:
            if overwrite:
                os.replace(self.path, self.out)
                return
            try:
                os.link(self.path, self.out)
            except FileExistsError:
                raise OutputExistsError("output appeared while this run was writing it (another program wrote "
                                        "it); nothing was replaced", path=self.out) from None
            except OSError:  # no hard links on this file system: check, then rename
                if os.path.lexists(self.out):
                    raise OutputExistsError("output appeared while this run was writing it; nothing was replaced",
                                            path=self.out) from None
                os.replace(self.path, self.out)
                return
            os.unlink(self.path)
        except BaseException:
            self.abandon()
            raise
        finally:
            self._release()

    def abandon(self) -> None:
        """Remove the temporary file (still ours: we hold the lock) and release the claim."""
        try:
            if self.fd >= 0 and _same_inode(self.fd, self.path):
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            self._release()

    def _release(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def claim(out: Path) -> Claim:
    """Create (or take over a stale) temporary file for ``out`` and hold it.

    Raises:
        OutputBusyError: another live process holds it.
        OSError: the folder refuses a new file (the writer turns it into a one-line error).
    """
    tmp = temp_path(out)
    if fcntl is None:
        return Claim(out, _create_exclusive(out, tmp))
    for _ in range(100):  # each retry means another process removed the file between our open and lock
        fd = os.open(tmp, _FLAGS | os.O_CREAT, 0o600)
        if not _try_lock(fd):
            os.close(fd)
            raise _busy(out)
        if _same_inode(fd, tmp):
            os.ftruncate(fd, 0)  # a stale file of a killed run: reuse it, from the start
            return Claim(out, fd)
        os.close(fd)
    raise _busy(out)


def _create_exclusive(out: Path, tmp: Path) -> int:
    for _ in range(100):
        try:
            return os.open(tmp, _FLAGS | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            try:
                os.unlink(tmp)  # Windows refuses while another process has it open: that one is live
            except PermissionError:
                raise _busy(out) from None
            except FileNotFoundError:
                pass
    raise _busy(out)


def clear_stale(out: Path) -> None:
    """Remove ``out``'s temporary file if it is stale; raise ``OutputBusyError`` if a live writer holds it.

    Operations call this (through ``check_output_path``) before expensive work, so a second
    writer hears at once and a killed run's leftover disappears even when this run then stops
    for another reason (the output exists, a bad input).
    """
    tmp = temp_path(out)
    if not os.path.lexists(tmp):
        return
    if fcntl is None:
        try:
            os.unlink(tmp)
        except PermissionError:
            raise _busy(out) from None
        except FileNotFoundError:
            pass
        return
    try:
        fd = os.open(tmp, _FLAGS)
    except FileNotFoundError:
        return
    except OSError:  # a symlink or something else we did not make: leave it alone
        return
    try:
        if not _try_lock(fd):
            raise _busy(out)
        if _same_inode(fd, tmp):
            os.unlink(tmp)
    finally:
        os.close(fd)

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

An output *folder* (a merged diffusers model) is claimed the same way: ``claim_folder`` builds it in
``.<name>.loratools-partial/`` and holds a lock on that folder; ``finish`` renames it into place.

Without ``fcntl`` (Windows) the temporary file is created exclusively instead; a stale one can be
deleted (no process has it open) and a live one cannot, which gives the same three answers. (A
temporary folder has no such tell there: an existing one is removed as stale.)
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from loratools import interrupts
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
    """The temporary file (or folder) of one output, open and locked; a file is empty at ``fd``'s 0.

    Either ``finish`` (rename onto the output) or ``abandon`` (remove it) must follow; both
    release the claim.
    """

    def __init__(self, out: Path, fd: int, *, folder: bool = False) -> None:
        self.out = out
        self.path = temp_path(out)
        self.fd = fd
        self.folder = folder
        self._held = False  # signals held since the claim was made, until ``arm``

    def arm(self) -> None:
        """Let Ctrl-C/SIGTERM/SIGHUP through again; call it first thing inside the ``try`` whose
        ``except`` abandons the claim (a signal that arrived meanwhile is raised right here)."""
        if self._held:
            self._held = False
            interrupts.release()

    def finish(self, *, overwrite: bool) -> None:
        """Give the written temporary file the output's name; refuse an output that appeared meanwhile."""
        try:
            if self.folder:
                _replace_folder(self.path, self.out, overwrite)
                return
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
        """Remove the temporary file or folder (still ours: we hold the lock) and release the claim."""
        try:
            if self.fd >= 0 and _same_inode(self.fd, self.path):
                _remove(self.path)
        except OSError:
            pass
        finally:
            self._release()

    def _release(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
        self.arm()


def _unkillable(make: Callable[[], Claim]) -> Claim:
    """``make()`` with Ctrl-C/SIGTERM/SIGHUP held (``loratools.interrupts``), returning the claim with
    them still held: a signal that arrives while the file is created is raised only when the
    caller, inside its ``try``, calls ``Claim.arm()``, where the cleanup runs."""
    interrupts.hold()
    try:
        made = make()
    except BaseException:
        interrupts.release()
        raise
    made._held = True
    return made


def claim(out: Path) -> Claim:
    """Create (or take over a stale) temporary file for ``out`` and hold it.

    Signals stay held back until ``Claim.arm()``: call it first inside the ``try`` whose ``except``
    calls ``abandon()`` (``finish``/``abandon`` let them through too).

    Raises:
        OutputBusyError: another live process holds it.
        OSError: the folder refuses a new file (the writer turns it into a one-line error).
    """
    return _unkillable(lambda: _claim_file(out))


def _claim_file(out: Path) -> Claim:
    tmp = temp_path(out)
    if fcntl is None:
        return Claim(out, _create_exclusive(out, tmp))
    return _lock_loop(out, False, lambda: os.open(tmp, _FLAGS | os.O_CREAT, 0o600),
                      lambda fd: os.ftruncate(fd, 0))  # a stale file of a killed run: reuse it, from the start


def claim_folder(out: Path) -> Claim:
    """``claim`` for an output folder: an empty ``.<name>.loratools-partial/`` to build it in, held
    (call ``arm()`` inside the ``try`` that abandons it, as for ``claim``).

    Raises:
        OutputBusyError: another live process is building the same output.
    """
    return _unkillable(lambda: _claim_folder(out))


def _claim_folder(out: Path) -> Claim:
    tmp = temp_path(out)

    def make() -> int:
        if fcntl is None or (os.path.lexists(tmp) and not tmp.is_dir()):
            _remove(tmp)
        try:
            os.mkdir(tmp)
        except FileExistsError:
            pass
        return -1 if fcntl is None else os.open(tmp, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
                                                | getattr(os, "O_CLOEXEC", 0))

    def empty(fd: int) -> None:
        for child in tmp.iterdir():  # a killed run's half-built folder: start empty
            _remove(child)

    if fcntl is None:
        return Claim(out, make(), folder=True)
    return _lock_loop(out, True, make, empty)


def _lock_loop(out: Path, folder: bool, make: Callable[[], int], reset: Callable[[int], None]) -> Claim:
    """Open (creating) the temporary file or folder and lock it; ``reset`` clears a stale one we took over.

    Each retry means another process removed it between our open and our lock.
    """
    tmp = temp_path(out)
    for _ in range(100):
        fd = make()
        locked = False
        try:
            locked = _try_lock(fd)
            if not locked:
                raise _busy(out)
            if _same_inode(fd, tmp):
                reset(fd)
                return Claim(out, fd, folder=folder)
        except BaseException:  # busy, or an error right now: never leave a temp we hold
            if locked:
                Claim(out, fd, folder=folder).abandon()
            else:
                os.close(fd)
            raise
        os.close(fd)
    raise _busy(out)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _replace_folder(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished folder onto ``out``; an existing ``out`` is replaced only with ``overwrite``."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    if not overwrite:
        raise OutputExistsError("output folder appeared while this run was writing it; nothing was replaced",
                                path=out)
    old = out.parent / f".{out.name}.loratools-old"
    _remove(old)
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


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
            _remove(tmp)
        except PermissionError:
            raise _busy(out) from None
        except FileNotFoundError:
            pass
        return
    try:
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return
    except OSError:  # a symlink or something else we did not make: leave it alone
        return
    try:
        if not _try_lock(fd):
            raise _busy(out)
        if _same_inode(fd, tmp):
            _remove(tmp)
    finally:
        os.close(fd)

"""Ctrl-C, SIGTERM and SIGHUP as one exception, and the few instructions during which it waits.

``install()`` (the CLI calls it once) makes the three signals raise ``errors.Interrupted`` in the
main thread, so every ``except``/``finally`` that cleans up after Ctrl-C also runs for ``timeout``,
a job scheduler's SIGTERM or a closed terminal's SIGHUP.

Python raises a signal's exception at whatever bytecode the main thread is at. Between a system
call that creates a temporary file and the ``try`` that would remove it there is always such a
boundary, so ``hold()`` makes the handler record the signal instead of raising, and ``release()``
(called first thing inside that ``try``) raises it. Masking the signal in the OS would not do: a
helper thread (merge's prefetch) can still receive it and Python raises it in the main thread.
"""

from __future__ import annotations

import signal

from loratools.errors import Interrupted

_state: dict[str, int | None] = {"holds": 0, "pending": None, "last": None}


def _handler(signum: int, frame: object) -> None:
    _state["last"] = signum
    if _state["holds"]:
        _state["pending"] = signum
        return
    raise Interrupted(signum)


def install() -> None:
    """SIGINT, SIGTERM and SIGHUP raise ``Interrupted`` (a ``KeyboardInterrupt``); handlers someone
    else set (``nohup`` ignoring SIGHUP, an embedding program) are kept."""
    for name, default in (("SIGINT", signal.default_int_handler), ("SIGTERM", signal.SIG_DFL),
                          ("SIGHUP", signal.SIG_DFL)):
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) in (default, None):
            signal.signal(signum, _handler)


def last_signal() -> int | None:
    """The last signal ``install()``'s handler saw (the CLI names it in its exit line)."""
    return _state["last"]


def hold() -> None:
    """From now until the matching ``release()``, a signal is recorded, not raised."""
    _state["holds"] = int(_state["holds"] or 0) + 1


def release() -> None:
    """End one ``hold()``; raise ``Interrupted`` for a signal that came meanwhile (once none is held)."""
    _state["holds"] = max(0, int(_state["holds"] or 0) - 1)
    pending = _state["pending"]
    if not _state["holds"] and pending is not None:
        _state["pending"] = None
        raise Interrupted(pending)

"""The ``loratools`` program: wires the command modules together and handles errors once.

Each command lives in its own module under ``loratools.cli`` and only wires options to an
operation in ``loratools.ops`` (or ``trainer``). Expected failures (``LoratoolsError``) are
printed as one line naming the file and the problem, with exit code 2; so are the failures of the
machine rather than of loratools (a full disk, a symbolic link loop, an I/O error: ``OSError``
with a file name). ``--debug`` (or ``LORATOOLS_DEBUG=1``) shows the traceback.

SIGTERM (``timeout``, job schedulers) and SIGHUP (a closed terminal) raise like Ctrl-C does
(``loratools.interrupts``), so every temporary file and folder is removed on the way out; the exit
code is 128 + the signal.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import traceback

import typer

from loratools import __version__, interrupts
from loratools.cli import check, convert, demo, ema, extract, merge, metadata, resize, train
from loratools.errors import Interrupted, LoratoolsError

app = typer.Typer(
    name="loratools",
    help="Train, resize, merge, extract, check and inspect Stable Diffusion LoRA/LyCORIS adapters "
    "(SD1.x, SD2, SDXL/Pony). LoRA/LoCon files it writes load in ComfyUI, A1111 and diffusers (LoHa/LoKr: "
    "ComfyUI and A1111; convert --to peft: diffusers); `check keys --loader all` shows what each loads.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: full flag names at any width, no <bool> type labels
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": bool(os.environ.get("LORATOOLS_DEBUG"))}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"loratools {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Global options."""
    if debug:
        _state["debug"] = True


app.add_typer(metadata.app, name="metadata")
app.add_typer(check.app, name="check")
resize.register(app)
merge.register(app)
extract.register(app)
ema.register(app)
convert.register(app)
train.register(app)
demo.register(app)


#: OSErrors that are the machine's answer, not a bug: printed as one line like a LoratoolsError.
_MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.ELOOP, errno.EACCES, errno.EPERM, errno.EIO,
                             errno.EROFS, errno.ENAMETOOLONG, errno.EFBIG, errno.ENOENT, errno.ENOTDIR,
                             errno.EISDIR, errno.EMFILE})


def _interrupted(signum: int) -> None:
    sys.stderr.write(f"interrupted ({signal.Signals(signum).name})\n")
    sys.exit(128 + int(signum))


def _error_line(message: str) -> None:
    from loratools.cli.output import out

    out.error(message)


def main() -> None:
    """Console-script entry point."""
    if "--debug" in sys.argv[1:]:
        _state["debug"] = True
    interrupts.install()
    try:
        app(prog_name="loratools")
    except SystemExit as exc:
        if exc.code == 130 and interrupts.last_signal():  # typer's exit for a KeyboardInterrupt
            _interrupted(interrupts.last_signal())
        raise
    except LoratoolsError as exc:
        if _state["debug"]:
            traceback.print_exc()
        _error_line(str(exc))
        sys.exit(exc.exit_code)
    except OSError as exc:
        if _state["debug"] or exc.errno not in _MACHINE_ERRNOS:
            raise
        from loratools.io.paths import os_problem

        # a copy that runs out of space names its source first; the full disk is the destination's
        where = exc.filename2 if exc.errno in (errno.ENOSPC, errno.EDQUOT) and exc.filename2 else exc.filename
        _error_line(f"{where}: {os_problem(exc, where)}" if where is not None else os_problem(exc))
        sys.exit(2)
    except KeyboardInterrupt as exc:
        _interrupted(exc.signum if isinstance(exc, Interrupted) else signal.SIGINT)


if __name__ == "__main__":
    main()

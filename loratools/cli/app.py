"""The ``loratools`` program: wires the command modules together and handles errors once.

Each command lives in its own module under ``loratools.cli`` and only wires options to an
operation in ``loratools.ops`` (or ``trainer``). Expected failures (``LoratoolsError``) are
printed as one line naming the file and the problem, with exit code 2; ``--debug`` (or
``LORATOOLS_DEBUG=1``) shows the traceback.
"""

from __future__ import annotations

import os
import sys
import traceback

import typer

from loratools import __version__
from loratools.cli import check, convert, merge, metadata, resize, train, demo
from loratools.errors import LoratoolsError

app = typer.Typer(
    name="loratools",
    help="Train, resize, merge, check and inspect Stable Diffusion LoRA/LyCORIS adapters "
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
convert.register(app)
train.register(app)
demo.register(app)


def main() -> None:
    """Console-script entry point."""
    if "--debug" in sys.argv[1:]:
        _state["debug"] = True
    try:
        app(prog_name="loratools")
    except LoratoolsError as exc:
        if _state["debug"]:
            traceback.print_exc()
        from loratools.cli.output import out

        out.error(str(exc))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)


if __name__ == "__main__":
    main()

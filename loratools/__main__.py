"""``python -m loratools`` runs the CLI."""

from loratools.cli.app import main

main()

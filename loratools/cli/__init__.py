"""Command-line interface. Thin: parse, call an operation, render; never imports torch at start-up."""

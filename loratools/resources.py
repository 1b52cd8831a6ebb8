"""Where files shipped with loratools live, in a checkout and after ``pip install``.

The named recipes are kept at the top of the repository (``recipes/``, where users look for
them); a wheel carries the same files as the package ``loratools.recipes`` (see setup.py).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path


def recipes_dir() -> Path:
    """The folder holding the training recipes and ``resize/`` recipes."""
    checkout = Path(__file__).resolve().parents[1] / "recipes"
    if checkout.is_dir():
        return checkout
    return Path(str(importlib.resources.files("loratools.recipes")))

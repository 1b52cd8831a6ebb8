"""The ``--device`` option: a device torch can use here, or one line saying why not.

Guides copy ``--device cuda`` from machines with a GPU; on a CPU-only install (or a machine
without the driver) torch fails deep inside the first tensor move with an assertion. Checking
once, before any work, turns that into an error naming the option and the fix.
"""

from __future__ import annotations

from loratools.errors import UsageError


def check_device(name: str, *, option: str = "--device") -> str:
    """``name`` if torch can allocate on it here, else ``UsageError`` naming ``option``.

    Example:
        >>> check_device("cpu")
        'cpu'
    """
    if name == "cpu":  # always there: a CPU-only command need not import torch for it
        return name
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"{option} {name!r} is not a device name; use cpu, cuda, cuda:1 or mps") from None
    if device.type == "cpu":
        return name
    available = {"cuda": torch.cuda.is_available,
                 "mps": lambda: hasattr(torch.backends, "mps") and torch.backends.mps.is_available(),
                 "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available()}.get(device.type)
    if available is None or not available():
        why = ("this torch build has no CUDA support (a CPU-only install)"
               if device.type == "cuda" and torch.version.cuda is None else f"no {device.type} device is available")
        raise UsageError(f"{option} {name}: {why}; use {option} cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"{option} {name}: there are only {torch.cuda.device_count()} CUDA device(s); "
                         f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return name

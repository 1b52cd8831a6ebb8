"""Kohya module names for the modules the trainer wraps, asked of the one vocabulary
(`loratools.keys.index.BaseIndex.from_modules`), so trained files are named exactly as every
other file loratools writes (SDXL UNet by SGM path, derived from the live UNet's own layout)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loratools.errors import UsageError
from loratools.keys.index import BaseIndex
from loratools.keys.naming import TEXT_ENCODER, TEXT_ENCODER_2, UNET


class KohyaNamer:
    """Maps (component, module path) of the live models to the kohya name sd-scripts would write."""

    def __init__(self, arch: str, unet: Any, text_encoders: Sequence[Any] = ()) -> None:
        self.arch = arch
        self.index = BaseIndex.from_modules(arch, unet, text_encoders)

    def unet(self, path: str) -> str:
        return self._name(UNET, path)

    def text_encoder(self, index: int, path: str) -> str:
        return self._name(TEXT_ENCODER_2 if index == 1 else TEXT_ENCODER, path)

    def _name(self, component: str, path: str) -> str:
        target = self.index.find(component, path)
        if target is None:
            raise UsageError(f"{component} module {path!r} has no weight of its own; it cannot be named in kohya form")
        return self.index.kohya_name(target)

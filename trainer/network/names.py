"""Kohya module names for the modules the trainer wraps, via `loratools.keys.naming`.

The SDXL SGM table is derived once from the live UNet's config (tiny and real UNets alike).
"""

from __future__ import annotations

from typing import Any

from loratools.keys.naming import TEXT_ENCODER, TEXT_ENCODER_2, UNET, kohya_name
from loratools.keys.unet_blocks import UNetBlockTable


class KohyaNamer:
    """Maps (component, module path) to the kohya name sd-scripts would write."""

    def __init__(self, arch: str, unet_config: Any) -> None:
        self.arch = arch
        self._table = UNetBlockTable.from_config(unet_config) if arch == "sdxl" else None

    def unet(self, path: str) -> str:
        return kohya_name(UNET, path, self.arch, unet_table=self._table)

    def text_encoder(self, index: int, path: str) -> str:
        return kohya_name(TEXT_ENCODER_2 if index == 1 else TEXT_ENCODER, path, self.arch)

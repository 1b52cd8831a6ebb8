"""diffusers <-> LDM/SGM block table for Stable Diffusion UNets, derived, never hard-coded.

The same UNet is spelled two ways: diffusers (`down_blocks.1.resnets.0.conv1`) and the
original LDM/SGM single-file layout (`input_blocks.4.0.in_layers.2`). The correspondence
depends on the number of levels, the resnets per level and which levels have attention
(formats-spec §3.2): SD1's first up level has no attention, so its upsampler is
`output_blocks.2.1.conv`, while SDXL's is `output_blocks.2.2.conv`; tiny test models have
two levels. So the table is built from a `UNetLayout` that is read from the model itself:
a checkpoint's key list (either spelling) or a diffusers UNet config.

Paths are UNet-relative module paths or parameter keys without the single-file
`model.diffusion_model.` prefix (it is stripped by the constructors that read keys).

Example:
    >>> table = UNetBlockTable.from_config(unet.config)
    >>> table.to_ldm("up_blocks.0.upsamplers.0.conv.weight")
    'output_blocks.2.1.conv.weight'
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from loratools.errors import InvalidFileError

LDM_UNET_PREFIX = "model.diffusion_model."

# ResnetBlock inner names: diffusers -> LDM (formats-spec §3.3).
_RESNET_INNER = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

# Top-level modules outside the blocks: diffusers -> LDM.
_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


@dataclass(frozen=True)
class Level:
    """One resolution level: how many resnets, whether they have attention, and whether a
    down/up sampler closes it."""

    resnets: int
    attention: bool
    sampler: bool


@dataclass(frozen=True)
class UNetLayout:
    """The block structure both spellings share. `mid_attention` is None when there is no
    mid block."""

    down: tuple[Level, ...]
    up: tuple[Level, ...]
    mid_attention: bool | None


class UNetBlockTable:
    """Bidirectional module-path table between diffusers and LDM/SGM UNet names.

    Translation matches the longest known module prefix (at `.` boundaries) and keeps the rest
    of the path verbatim, so it works for module paths and parameter keys alike.
    """

    def __init__(self, layout: UNetLayout) -> None:
        self.layout = layout
        self._to_ldm: dict[str, str] = {}
        for dif, ldm in _TOP_LEVEL.items():
            self._add(dif, ldm)
        self._build(layout)
        self._to_dif = {ldm: dif for dif, ldm in self._to_ldm.items()}

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> UNetBlockTable:
        """Build from a diffusers `UNet2DConditionModel` config (dict or FrozenDict/object)."""
        get = (lambda k, d=None: config.get(k, d)) if isinstance(config, Mapping) else (
            lambda k, d=None: getattr(config, k, d))
        down_types = list(get("down_block_types"))
        up_types = list(get("up_block_types"))
        n = len(down_types)
        lpb = get("layers_per_block", 2)
        per_level = [int(lpb)] * n if isinstance(lpb, int) else [int(x) for x in lpb]
        down = tuple(Level(per_level[i], "Attn" in down_types[i], i < n - 1) for i in range(n))
        rev = list(reversed(per_level))
        up = tuple(Level(rev[i] + 1, "Attn" in up_types[i], i < n - 1) for i in range(len(up_types)))
        mid_type = get("mid_block_type", "UNetMidBlock2DCrossAttn")
        mid = None if mid_type is None else "CrossAttn" in mid_type
        return cls(UNetLayout(down, up, mid))

    @classmethod
    def from_keys(cls, keys: Iterable[str]) -> UNetBlockTable:
        """Build from a UNet key list in either spelling.

        Accepts whole single-file key lists (non-UNet keys are ignored, the
        `model.diffusion_model.` prefix is stripped) or a diffusers UNet's own keys.
        """
        unet_keys = []
        for k in keys:
            if k.startswith(LDM_UNET_PREFIX):
                unet_keys.append(k[len(LDM_UNET_PREFIX):])
            elif "." in k and k.split(".", 1)[0] in ("input_blocks", "output_blocks", "middle_block",
                                                      "down_blocks", "up_blocks", "mid_block"):
                unet_keys.append(k)
        if any(k.startswith("input_blocks.") for k in unet_keys):
            return cls(_layout_from_ldm(unet_keys))
        if any(k.startswith("down_blocks.") for k in unet_keys):
            return cls(_layout_from_diffusers(unet_keys))
        raise InvalidFileError("no UNet blocks found (neither `input_blocks.*` nor `down_blocks.*` keys); "
                               "is this a Stable Diffusion UNet?")

    @classmethod
    def standard(cls, arch: str) -> UNetBlockTable:
        """The table of the released SD1.x/SD2.x or SDXL-base UNet, for when no model is at hand
        (e.g. renaming an adapter without its base)."""
        if arch in ("sd1", "sd2"):
            down = (Level(2, True, True),) * 3 + (Level(2, False, False),)
            up = (Level(3, False, True),) + (Level(3, True, True),) * 2 + (Level(3, True, False),)
        elif arch == "sdxl":
            down = (Level(2, False, True), Level(2, True, True), Level(2, True, False))
            up = (Level(3, True, True), Level(3, True, True), Level(3, False, False))
        else:
            raise ValueError(f"no standard UNet layout for architecture {arch!r}")
        return cls(UNetLayout(down, up, True))

    def _add(self, dif: str, ldm: str) -> None:
        self._to_ldm[dif] = ldm

    def _add_resnet(self, dif: str, ldm: str) -> None:
        self._add(dif, ldm)
        for d, l in _RESNET_INNER.items():
            self._add(f"{dif}.{d}", f"{ldm}.{l}")

    def _build(self, layout: UNetLayout) -> None:
        n = 1
        for i, level in enumerate(layout.down):
            for j in range(level.resnets):
                self._add_resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0")
                if level.attention:
                    self._add(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1")
                n += 1
            if level.sampler:
                self._add(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{n}.0.op")
                n += 1
        if layout.mid_attention is not None:
            self._add_resnet("mid_block.resnets.0", "middle_block.0")
            if layout.mid_attention:
                self._add("mid_block.attentions.0", "middle_block.1")
                self._add_resnet("mid_block.resnets.1", "middle_block.2")
            else:
                self._add_resnet("mid_block.resnets.1", "middle_block.1")
        n = 0
        for i, level in enumerate(layout.up):
            for j in range(level.resnets):
                self._add_resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0")
                if level.attention:
                    self._add(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1")
                if level.sampler and j == level.resnets - 1:
                    sub = 2 if level.attention else 1
                    self._add(f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{n}.{sub}.conv")
                n += 1

    # -- translation --------------------------------------------------------------------

    def to_ldm(self, path: str) -> str | None:
        """diffusers UNet path -> LDM/SGM path (no `model.diffusion_model.` prefix), or None."""
        return _translate(path, self._to_ldm)

    def to_diffusers(self, path: str) -> str | None:
        """LDM/SGM UNet path (prefix optional) -> diffusers path, or None."""
        if path.startswith(LDM_UNET_PREFIX):
            path = path[len(LDM_UNET_PREFIX):]
        return _translate(path, self._to_dif)

    def pairs(self) -> dict[str, str]:
        """Every module prefix the table knows, diffusers -> LDM (a copy)."""
        return dict(self._to_ldm)


def _translate(path: str, table: dict[str, str]) -> str | None:
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        hit = table.get(".".join(parts[:cut]))
        if hit is not None:
            return ".".join([hit, *parts[cut:]])
    return None


_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.*)$")


def _layout_from_ldm(keys: list[str]) -> UNetLayout:
    subs: dict[tuple[str, int], dict[int, set[str]]] = {}
    for k in keys:
        m = _BLOCK.match(k)
        if m:
            subs.setdefault((m[1], int(m[2])), {}).setdefault(int(m[3]), set()).add(m[4])

    def levels(kind: str, first: int, is_sampler) -> list[Level]:
        idx = sorted(n for (knd, n) in subs if knd == kind and n >= first)
        if idx != list(range(first, first + len(idx))):
            raise InvalidFileError(f"UNet {kind} indices are not contiguous: {idx}")
        out: list[Level] = []
        count, attn = 0, False
        for n in idx:
            blk = subs[(kind, n)]
            sampler = is_sampler(blk)
            if kind == "input_blocks" and sampler:
                out.append(Level(count, attn, True))
                count, attn = 0, False
                continue
            count += 1
            attn = attn or any(not s.startswith("conv.") for s in blk.get(1, ()))
            if kind == "output_blocks" and sampler:
                out.append(Level(count, attn, True))
                count, attn = 0, False
        if count:
            out.append(Level(count, attn, False))
        return out

    down = levels("input_blocks", 1, lambda blk: any(s.startswith("op.") for s in blk.get(0, ())))
    up = levels("output_blocks", 0,
                lambda blk: any(s.startswith("conv.") for m, ss in blk.items() if m >= 1 for s in ss))
    mids = {int(k.split(".")[1]) for k in keys if k.startswith("middle_block.")}
    if not mids:
        mid = None
    else:
        mid = any(k.startswith("middle_block.1.") and ("proj_in" in k or "transformer_blocks" in k)
                  for k in keys)
    _check_levels(down, up)
    return UNetLayout(tuple(down), tuple(up), mid)


_DIF = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.")


def _layout_from_diffusers(keys: list[str]) -> UNetLayout:
    found: dict[tuple[str, int], dict[str, set[int]]] = {}
    for k in keys:
        m = _DIF.match(k)
        if m:
            found.setdefault((m[1], int(m[2])), {}).setdefault(m[3], set()).add(int(m[4]))

    def levels(kind: str, sampler: str) -> list[Level]:
        idx = sorted(n for (knd, n) in found if knd == kind)
        if idx != list(range(len(idx))):
            raise InvalidFileError(f"UNet {kind} indices are not contiguous: {idx}")
        return [Level(len(found[(kind, i)].get("resnets", ())), "attentions" in found[(kind, i)],
                      sampler in found[(kind, i)]) for i in idx]

    down, up = levels("down_blocks", "downsamplers"), levels("up_blocks", "upsamplers")
    if any(k.startswith("mid_block.attentions.") for k in keys):
        mid: bool | None = True
    elif any(k.startswith("mid_block.") for k in keys):
        mid = False
    else:
        mid = None
    _check_levels(down, up)
    return UNetLayout(tuple(down), tuple(up), mid)


def _check_levels(down: list[Level], up: list[Level]) -> None:
    if not down or len(down) != len(up):
        raise InvalidFileError(f"UNet has {len(down)} down levels but {len(up)} up levels; "
                               "the key list is incomplete or not a Stable Diffusion UNet")

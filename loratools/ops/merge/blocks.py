"""Per-block strengths of a merge: sd-scripts' ``--lbws`` lists and named presets (``recipes/lbw/``).

A block-weight list multiplies each module's ratio by the weight of its UNet block (LBW slots,
``loratools.keys.blocks``): 17 or 26 weights for SD1/SD2, 12, 20 or 26 for SDXL, the first one
(``BASE``) for the text encoders. A shorter list names a subset of the 26 slots (sd-scripts'
LAYER12/17/20 tables); the slots it does not name keep weight 1, as in sd-scripts. ``--te-scale``
multiplies the text encoders' weight on top of ``BASE``.

Presets are data: ``recipes/lbw/<NAME>.toml`` holds ``sd = [...]`` (SD1/SD2) and, where one exists,
``sdxl = [...]``, in any of the lengths above.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from loratools.errors import UsageError
from loratools.keys.blocks import LBW_BLOCK_IDS, LBW_LAYOUTS, LBW_LENGTHS, lbw_slot
from loratools.ops.merge.ratios import finite_float

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

_FAMILY = {"sd1": "sd", "sd2": "sd", "sdxl": "sdxl"}


@dataclass(frozen=True)
class BlockWeights:
    """One adapter's block weights: ``weights[slot]`` for the 26 LBW slots, and how they were given.

    Attributes:
        text: the preset name or the list as typed.
        weights: 26 values (slots the list did not name are 1).
        named: the LBW ids the list gave a weight for.
    """

    text: str
    weights: tuple[float, ...]
    named: tuple[str, ...]

    def factor(self, kohya_name: str, arch: str) -> float:
        """The multiplier of one module (1 outside the numbered blocks)."""
        slot = lbw_slot(kohya_name, arch)
        return 1.0 if slot < 0 else self.weights[slot]

    def covers(self, kohya_name: str, arch: str) -> bool:
        """Whether the list named this module's block (False: it kept weight 1 by default)."""
        slot = lbw_slot(kohya_name, arch)
        return slot >= 0 and LBW_BLOCK_IDS[slot] in self.named

    def as_json(self) -> dict[str, object]:
        return {"given": self.text, "weights": dict(zip(LBW_BLOCK_IDS, self.weights))}


def presets() -> dict[str, Path]:
    """Shipped block-weight presets (upper-case name -> file)."""
    from loratools.resources import recipes_dir

    folder = recipes_dir() / "lbw"
    return {p.stem.upper(): p for p in sorted(folder.glob("*.toml"))} if folder.is_dir() else {}


def is_preset(text: str) -> bool:
    """Whether ``text`` names a shipped preset (case-insensitive)."""
    return text.strip().upper() in presets()


def looks_like_list(text: str) -> bool:
    """``[1,0,...]`` or ``1,0,...``: a block-weight list rather than a ratio or a path part."""
    body = text.strip()
    if body.startswith("[") and body.endswith("]"):
        return True
    parts = body.split(",")
    return len(parts) > 1 and all(finite_float(p) is not None for p in parts)


def _parse_list(text: str, origin: str) -> list[float]:
    body = text.strip()
    try:
        values = json.loads(body if body.startswith("[") else f"[{body}]")
    except ValueError:
        raise UsageError(f"{origin}: block weights {text!r} are not a list of numbers; write e.g. "
                         "[1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0] or a preset name") from None
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               and math.isfinite(v) for v in values):
        raise UsageError(f"{origin}: block weights {text!r} must be a list of finite numbers")
    return [float(v) for v in values]


def _preset_values(name: str, arch: str, origin: str) -> list[float]:
    path = presets()[name.strip().upper()]
    with path.open("rb") as f:
        data = tomllib.load(f)
    family = _FAMILY[arch]
    values = data.get(family)
    if values is None:
        fitting = sorted(n for n, p in presets().items() if family in tomllib.loads(p.read_text()))
        raise UsageError(f"{origin}: block-weight preset {name} has no {arch.upper()} version; "
                         f"{arch.upper()} presets: {', '.join(fitting)} (or give 12, 20 or 26 weights)")
    return _parse_list(json.dumps(values), f"{path}")


def parse_block_weights(text: str, arch: str, *, origin: str) -> BlockWeights:
    """Block weights from a preset name or a list, checked against the architecture.

    Args:
        text: ``OUTD``, ``[1,0,...]`` or ``1,0,...``.
        arch: "sd1", "sd2" or "sdxl" (the base model's).
        origin: where the text came from, for messages (``--lbws #1``, the adapter argument).

    Raises:
        UsageError: unknown preset, not a list of numbers, or a length the architecture has no
            layout for (naming the lengths that fit).

    Example:
        >>> parse_block_weights("OUTD", "sd1", origin="a.safetensors").factor(
        ...     "lora_unet_up_blocks_1_attentions_0_proj_in", "sd1")
        1.0
    """
    if arch not in LBW_LENGTHS:
        raise UsageError(f"{origin}: block weights need an SD1, SD2 or SDXL model (got {arch})")
    if is_preset(text):
        values = _preset_values(text, arch, origin)
    elif looks_like_list(text) or text.strip().startswith("["):
        values = _parse_list(text, origin)
    else:
        raise UsageError(f"{origin}: unknown block-weight preset {text!r}; presets: {', '.join(presets())} "
                         "(or give a list of weights)")
    fits = LBW_LENGTHS[arch]
    if len(values) not in fits:
        other = [a.upper() for a, lengths in LBW_LENGTHS.items() if len(values) in lengths and a != "sd2"]
        hint = f" ({len(values)} weights is the {' / '.join(other)} layout)" if other else ""
        raise UsageError(f"{origin}: {len(values)} block weights do not fit {arch.upper()}{hint}; give "
                         f"{' or '.join(str(n) for n in fits)} (BASE first, then "
                         f"{', '.join(LBW_LAYOUTS[fits[0]][1:4])}, ...)")
    named = LBW_LAYOUTS[len(values)]
    weights = [1.0] * len(LBW_BLOCK_IDS)
    for block, value in zip(named, values):
        weights[LBW_BLOCK_IDS.index(block)] = value
    return BlockWeights(text.strip(), tuple(weights), named)

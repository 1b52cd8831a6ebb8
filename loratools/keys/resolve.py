"""Where each module of an adapter lands, and the one kohya name loratools writes for it.

Every writer asks here (convert, merge --to-lora, resize), so a file written by loratools names
each base weight once, in the spelling every loader maps (formats-spec 5.5: SD1/SD2 UNet by
diffusers path, SDXL UNet by SGM path, text encoders `lora_te_`/`lora_te1_`/`lora_te2_`).

With a base (`BaseIndex.source` "checkpoint" or "modules") a name either resolves or does not.
Without one the index is the released model of the architecture (`BaseIndex.standard`) and a
name can only *look* right: a tiny or custom-layout model uses the same words for other blocks.
So, without a base:

* a module whose shape fits the released model's weight is taken as that weight;
* a module named by its diffusers path (`lora_unet_down_blocks_...`, PEFT `unet.`, `lycoris_`,
  any text-encoder name) names the same module in every layout, so its identity is kept even when
  the shape does not fit; it is written with that layout-free name (`diffusers_kohya_name`);
* a module named by its SGM path (`lora_unet_input_blocks_4_1_...`) whose shape does not fit
  depends on the unknown layout: it is unresolved, and callers say "pass --base".

Example:
    >>> placed = place_modules({"unet.down_blocks.1.attentions.0.proj_in": (640, 640)}, BaseIndex.standard("sdxl"))
    >>> placed.placed["unet.down_blocks.1.attentions.0.proj_in"].write_name
    'lora_unet_input_blocks_4_1_proj_in'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from loratools.keys.index import LAYOUT_BOUND, BaseIndex, Target, shapes_compatible

_SHAPE = tuple[int, ...]


@dataclass(frozen=True)
class Placement:
    """One adapter module resolved.

    Attributes:
        name: the module's name in the adapter (canonical form).
        target: the weight it changes (for the standard index: the released model's weight of the
            same module).
        write_name: the kohya name to write it under.
        fits: its shape fits `target.shape` (False only without a base, for a layout-free name).
    """

    name: str
    target: Target
    write_name: str
    fits: bool


@dataclass
class Placements:
    """`placed`: name -> `Placement`; `unresolved`: names that name no weight (or, without a base,
    depend on a layout the index cannot know); `index`: what they were resolved against."""

    index: BaseIndex
    placed: dict[str, Placement] = field(default_factory=dict)
    unresolved: list[str] = field(default_factory=list)

    def unfit_note(self) -> str | None:
        """A warning when, without a base, modules that did not fit the released model are written
        with their layout-free name instead of the layout-bound kohya one (SDXL UNet), else None."""
        unfit = [p.name for p in self.placed.values()
                 if not p.fits and p.write_name != self.index.kohya_name(p.target)]
        if not unfit:
            return None
        return (f"{len(unfit)} module(s) do not fit the released {self.index.arch.label} model (first: {unfit[0]}): "
                "named by their diffusers path (lora_unet_down_blocks_...), which ComfyUI and diffusers load; "
                "pass --base with the model they were made for to get its SGM names")

    def hint(self) -> str:
        """What to do about `unresolved` names, for error messages."""
        if self.index.source == "standard":
            return (f"they are not modules of the released {self.index.arch.label} model (another layout, e.g. a "
                    "tiny or distilled UNet, or another architecture); pass --base with the model the adapter "
                    "was made for")
        return "the base model has no such weights; is the adapter for another model?"


def module_shapes(adapter: Any) -> dict[str, _SHAPE | None]:
    """`{module name: delta shape or None}` of an `AdapterFile` or a `describe_header` summary
    (IA3 has no delta shape)."""
    out: dict[str, _SHAPE | None] = {}
    for name, module in adapter.modules.items():
        try:
            shape = module.weight_shape
        except (NotImplementedError, AttributeError, ValueError):
            shape = None
        out[name] = tuple(shape) if shape is not None else None
    return out


def place_modules(modules: Mapping[str, _SHAPE | None], index: BaseIndex) -> Placements:
    """Resolve every module name (with its delta shape, None when unknown) against `index`."""
    out = Placements(index)
    standard = index.source == "standard"
    for name, shape in modules.items():
        target = index.resolve(name)
        if target is None:
            out.unresolved.append(name)
            continue
        fits = shape is None or shapes_compatible(shape, target.shape)
        if fits or not standard:
            out.placed[name] = Placement(name, target, index.kohya_name(target), fits)
        elif index.alias_kind(name) not in LAYOUT_BOUND:
            out.placed[name] = Placement(name, target, index.diffusers_kohya_name(target), False)
        else:
            out.unresolved.append(name)
    return out


def index_for(arch: str | None, base_index: BaseIndex | None = None) -> BaseIndex | None:
    """The index names are resolved against: the base's when given, else the released model of
    `arch`, else None (architecture unknown)."""
    if base_index is not None:
        return base_index
    return BaseIndex.standard(arch) if arch is not None else None


def output_names(adapter: Any, base_index: BaseIndex | None = None) -> dict[str, str]:
    """`{canonical name: kohya name to write}` for every module of an adapter, for writers that
    keep modules one to one (resize): the vocabulary's name where the module resolves, else its
    own canonical name (already kohya form: `adapters` canonicalises every family to it)."""
    from loratools.errors import ArchitectureMismatchError
    from loratools.keys.arch import guess_adapter_arch

    arch = None
    if base_index is None:
        try:
            info = guess_adapter_arch(adapter, getattr(adapter, "metadata", None))
        except ArchitectureMismatchError:
            info = None
        arch = info.arch if info is not None else None
    index = index_for(arch, base_index)
    names = {name: name for name in adapter.modules}
    if index is not None:
        placed = place_modules(module_shapes(adapter), index).placed
        written: dict[str, list[str]] = {}
        for name, p in placed.items():
            written.setdefault(p.write_name, []).append(name)
        # two modules of one file on one weight (mixed spellings) keep their own names: renaming
        # both to one name would lose one of them
        names.update({names_[0]: write for write, names_ in written.items() if len(names_) == 1})
    return names

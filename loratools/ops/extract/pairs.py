"""Which weights of the tuned model and the base are compared, paired through the one vocabulary.

Both models are indexed by ``loratools.keys`` (single files and diffusers folders alike, any mix);
every base weight in the chosen ``networks.lora`` scope (``keys.scope``) is paired with the tuned
model's weight of the same kohya name, which names one module whatever the layout. The pair is
read one at a time (``read_difference``): two lazily mapped tensors, their float32 difference, and
their pages dropped again, so memory stays at one layer whatever the model size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loratools.errors import ArchitectureMismatchError, InvalidFileError

if TYPE_CHECKING:
    import torch

    from loratools.io import ModelSource
    from loratools.keys.index import Target


@dataclass(frozen=True)
class Pair:
    """One weight to extract: its kohya name, where it is in each model, its shape and scope."""

    name: str
    label: str  # "UNet", "TE1", "TE2"
    component: str  # "unet", "text_encoder", "text_encoder_2"
    scope: str  # "attn" or "conv"
    base: Target
    tuned: Target

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    @property
    def kxk(self) -> bool:
        return len(self.shape) == 4 and self.shape[2:] != (1, 1)

    @property
    def params(self) -> int:
        """Elements per rank of a LoRA on it (``out + in*kh*kw``), the ``params`` score's reference."""
        return self.shape[0] + math.prod(self.shape[1:])


@dataclass
class Pairing:
    """Every pair, the two models' architecture, and base weights the tuned model lacks."""

    pairs: list[Pair]
    arch: str
    prediction: str | None
    missing: list[str]


def pair_models(tuned: ModelSource, base: ModelSource, scope: str) -> Pairing:
    """Pair the weights of ``scope`` ("attn": sd-scripts' default targets; "all": also the ResNet and
    sampler convs of a LoCon) of two models of one architecture.

    Raises:
        ArchitectureMismatchError: the models are different architectures, or a paired weight has
            another shape in the tuned model (naming the key).
    """
    from loratools.keys.index import BaseIndex
    from loratools.keys.scope import module_scope

    base_index = BaseIndex.from_model(base)
    tuned_index = BaseIndex.from_model(tuned)
    if tuned_index.arch.arch != base_index.arch.arch:
        raise ArchitectureMismatchError(
            f"the tuned model is {tuned_index.arch.label} ({tuned_index.arch.evidence}) but the base "
            f"{base.path.name} is {base_index.arch.label}; extract from a fine-tune of that base", path=tuned.path)
    pairs: list[Pair] = []
    missing: list[str] = []
    for target in base_index.targets():
        info = base_index.info(target)
        kind = module_scope(info.component, info.path, tuple(target.shape))
        if kind is None or (scope == "attn" and kind != "attn"):
            continue
        other = tuned_index.resolve(info.kohya_name)
        if other is None:
            missing.append(info.kohya_name)
            continue
        if tuple(other.shape) != tuple(target.shape):
            raise ArchitectureMismatchError(
                f"{other.key} is {tuple(other.shape)} in the tuned model but {target.key} is "
                f"{tuple(target.shape)} in the base; the models have different layouts", path=tuned.path)
        pairs.append(Pair(info.kohya_name, info.label, info.component, kind, target, other))
    prediction = tuned_index.arch.prediction or base_index.arch.prediction
    return Pairing(pairs, base_index.arch.arch, prediction, missing)


def _view(model: ModelSource, target: Target) -> torch.Tensor:
    """The mapped weight (its rows for a fused q/k/v), ``[out, n]``: no data is copied."""
    sd = model.components[target.component]
    try:
        w = sd[target.key]
    except KeyError:
        raise InvalidFileError(f"{target.key} is listed but cannot be read", path=model.path) from None
    if target.rows is not None:
        w = w[target.rows[0]:target.rows[1]]
    return w.reshape(w.shape[0], -1)


def read_difference(tuned: ModelSource, base: ModelSource, pair: Pair) -> tuple[torch.Tensor, torch.Tensor]:
    """``(D, W)``: the float32 difference ``tuned - base`` ``[out, n]`` (the one copy made) and the
    base weight as mapped (its own dtype, read again only by scores that need it). Call
    ``release`` once the layer is done."""
    import torch

    W = _view(base, pair.base)
    D = _view(tuned, pair.tuned).to(torch.float32, copy=True)
    return D.sub_(W), W


def release(tuned: ModelSource, base: ModelSource, pair: Pair) -> None:
    """Drop both weights' pages from the process (``io.release_pages``)."""
    from loratools.io.checkpoint import release_pages

    release_pages(base.components[pair.base.component], pair.base.key)
    release_pages(tuned.components[pair.tuned.component], pair.tuned.key)

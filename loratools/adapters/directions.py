"""A module's delta as ranked directions, in the module's own form: what ``resize`` reduces.

Each adapter type that can be shrunk answers ``AdapterModule.directions()`` with one of these
(LoRA/LoCon/Tucker/DoRA: the singular triplets of ``scale * up @ down``; LoHa: its Hadamard
factor pairs; LoKr: its low-rank Kronecker factor), so the resize engine never asks which type
it holds. The engine only scores ``S`` and asks for the reduced module's tensors:

1. ``S`` (1-D numpy float32, descending): the strength of each direction, the module's scale
   included. Keeping the directions ``keep`` leaves out exactly (LoRA) or as near as the type
   allows (documented by the type) ``sqrt(sum(S[i]**2 for i not in keep))`` of the delta's
   Frobenius norm, so every recipe's score means the same thing for every type: how much of
   the layer's delta a direction carries.
2. ``specs(k, dtype)``: suffix -> (shape, safetensors dtype name) of the module reduced to ``k``
   directions, known before any tensor is built (``size=`` recipes size files from it);
   ``dtype`` is the factors' safetensors name ("F16", "BF16", "F32"; a torch or numpy dtype
   is taken too).
3. ``tensors(keep, dtype, rescale)``: suffix -> array of that reduced module (a numpy array or a
   torch tensor: the writer takes both), the alpha (float32 scalar) included, under the suffixes
   of ``kind`` (kohya spelling).

The engine itself works on numpy (spectra, scores, selection), so resizing a LoRA never imports
torch; a type whose maths needs torch (LoHa, LoKr) imports it itself.

Optional, with defaults every type inherits: ``weight_shape`` (the layer shape to write; the
engine sets the base weight's when it differs from the file's only in layout, e.g. a 1x1 conv
stored as a linear: a type whose factors fix their own layout ignores it), ``keep_one`` (a layer
that must keep a direction: DoRA's magnitude would be orphaned at rank 0), ``projections``
(``subspace`` scores), ``alpha(k)`` and ``tensors(..., rank=, kohya=)`` (sd-scripts' padding and alpha rounding
for ``--kohya-compat``; a type without them leaves them unsupported and is never padded).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch


class Directions(ABC):
    """One module's ranked directions (see the module docstring).

    Attributes:
        kind: the adapter type the reduced module is written as ("lora", "loha", "lokr").
        S: the directions' strengths, descending, scale included.
        old_rank: the module's rank as its file counts it (the table's "old rank").
        full_len: the most directions any reduction could keep (a LoRA's ``min(out, in*kh*kw)``).
    """

    kind: str
    S: np.ndarray
    old_rank: int
    full_len: int
    weight_shape: tuple[int, ...] | None = None
    keep_one: bool = False
    #: ``tensors`` takes ``rank=`` (pad with zero directions) and ``kohya=`` (sd-scripts' alpha rounding)
    pads: bool = False
    #: ``tensors`` may run on several threads at once (numpy maths; torch's thread setting is global)
    threadsafe: bool = False

    @abstractmethod
    def specs(self, k: int, dtype: str) -> dict[str, tuple[tuple[int, ...], str]]:
        """Suffix -> (shape, safetensors dtype name) of every tensor of the module reduced to ``k`` directions."""

    @abstractmethod
    def tensors(self, keep: Sequence[int], dtype: str, rescale: float = 1.0) -> dict[str, np.ndarray | torch.Tensor]:
        """The module reduced to the directions ``keep`` (indices into ``S``), every strength
        multiplied by ``rescale``; shapes and dtypes as ``specs(len(keep), dtype)`` says."""

    def alpha(self, k: int, *, kohya: bool = False) -> float | None:
        """The alpha the module reduced to ``k`` directions stores, known before its tensors are
        built (metadata's ``ss_network_alpha``, and the writer asks for scalars first); None when
        the type stores none or only ``tensors`` knows it."""
        return None

    def projections(self, weight: torch.Tensor) -> np.ndarray | None:
        """``|u_i^T W v_i|`` of each direction on the base weight ``W`` (elias' ``subspace`` score),
        or None where a direction is not one rank-1 pair (the score then uses ``S`` itself)."""
        return None

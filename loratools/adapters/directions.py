"""A module's delta as ranked directions, in the module's own form: what ``resize`` reduces.

Each adapter type that can be shrunk answers ``AdapterModule.directions()`` with one of these
(LoRA/LoCon/Tucker/DoRA: the singular triplets of ``scale * up @ down``; LoHa: its Hadamard
factor pairs; LoKr: its low-rank Kronecker factor), so the resize engine never asks which type
it holds. The engine only scores ``S`` and asks for the reduced module's tensors:

1. ``S`` (1-D, float32, CPU, descending): the strength of each direction, the module's scale
   included. Keeping the directions ``keep`` leaves out exactly (LoRA) or as near as the type
   allows (documented by the type) ``sqrt(sum(S[i]**2 for i not in keep))`` of the delta's
   Frobenius norm, so every recipe's score means the same thing for every type: how much of
   the layer's delta a direction carries.
2. ``specs(k, dtype)``: suffix -> (shape, dtype) of the module reduced to ``k`` directions,
   known before any tensor is built (``size=`` recipes size files from it).
3. ``tensors(keep, dtype, rescale)``: suffix -> tensor of that reduced module, the alpha
   (float32 scalar) included, under the suffixes of ``kind`` (kohya spelling).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
    S: torch.Tensor
    old_rank: int
    full_len: int

    @abstractmethod
    def specs(self, k: int, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Suffix -> (shape, dtype) of every tensor of the module reduced to ``k`` directions."""

    @abstractmethod
    def tensors(self, keep: Sequence[int], dtype: torch.dtype, rescale: float = 1.0) -> dict[str, torch.Tensor]:
        """The module reduced to the directions ``keep`` (indices into ``S``), every strength
        multiplied by ``rescale``; shapes and dtypes as ``specs(len(keep), dtype)`` says."""

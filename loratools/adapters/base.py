"""The one in-memory form of an adapter module, and the registry of adapter types.

Every algorithm (LoRA, LoHa, LoKr, IA3, full diff, norm diff) is a frozen dataclass that
subclasses ``AdapterModule``: named tensor fields instead of positional tuples, one ``parse``
that recognises its own suffixes, one ``delta`` that returns the weight change in float32.
Subclasses register themselves when they are defined; two types that claim the same suffix
raise at import, so a key can never be read two ways depending on dictionary order.

``alpha``, ``dora_scale`` and A1111's ``scale`` are shared: several types carry them, so no type
claims them and they never decide which type a module is.

Factor shapes are validated once, by each type's ``describe`` (which ``parse`` calls too): a rank
that differs between factors, a conv ``up`` with a kernel, an empty factor or a non-scalar alpha
raise ``InvalidFileError`` naming the module and the shapes, whether the caller reads tensors
(check weights, merge, resize, convert) or only the header (check keys, metadata show).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from loratools.errors import InvalidFileError, NonFiniteError

if TYPE_CHECKING:  # torch is imported lazily so that header-only callers stay light
    import numpy as np
    import torch

    from loratools.adapters.directions import Directions

#: Suffixes that belong to no single type (kohya spelling, after the module name's dot).
SHARED_SUFFIXES: tuple[str, ...] = ("alpha", "dora_scale", "scale")

_REGISTRY: dict[str, type[AdapterModule]] = {}


def registry() -> dict[str, type[AdapterModule]]:
    """Suffix -> adapter type, for every suffix a registered type claims."""
    return dict(_REGISTRY)


@dataclass(frozen=True)
class ModuleSummary:
    """What a module's header (names and shapes, no tensor data) tells about it.

    ``alpha_key`` is the file key of the alpha scalar, for callers that want the alpha
    without reading any factor (one 2-byte read); ``alpha`` is filled when the format keeps it
    outside the tensors (PEFT metadata).
    """

    name: str
    source_name: str
    kind: str
    rank: int | None
    weight_shape: tuple[int, ...] | None
    factor_shapes: dict[str, tuple[int, ...]]
    alpha_key: str | None = None
    alpha: float | None = None
    dora: bool = False
    scale_key: str | None = None  # A1111 ``<module>.scale``: overrides alpha / rank when present


@dataclass(frozen=True, eq=False, kw_only=True)
class AdapterModule:
    """One module of an adapter file in canonical form.

    Attributes:
        name: canonical kohya name (``lora_unet_input_blocks_4_1_proj_in``, ``lora_te1_text_model_...``).
        source_name: the module name exactly as the file spells it (dotted for PEFT files).
        alpha: the stored alpha, or None when the file has none (scale 1 for the scaled types).
        scale_override: A1111's optional ``<module>.scale`` tensor (formats-spec 1.4 item 10): when
            present it IS the scale, whatever alpha and rank say. Read, never written: ``tensors()``
            folds it into ``alpha`` (``scale * rank``) so every loader computes the same delta.
    """

    kind: ClassVar[str] = ""
    SUFFIXES: ClassVar[tuple[str, ...]] = ()
    #: Whether ``alpha`` / ``dora_scale`` may accompany this type.
    TAKES_ALPHA: ClassVar[bool] = False
    TAKES_DORA: ClassVar[bool] = False

    name: str
    source_name: str = ""
    alpha: float | None = None
    scale_override: float | None = None

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" not in cls.__dict__:
            return
        if not cls.kind or not cls.SUFFIXES:
            raise TypeError(f"adapter type {cls.__name__} must define `kind` and `SUFFIXES`")
        for suffix in cls.SUFFIXES:  # check every suffix before registering any
            if suffix in SHARED_SUFFIXES:
                raise TypeError(f"adapter type {cls.__name__} claims shared suffix {suffix!r}")
            other = _REGISTRY.get(suffix)
            if other is not None and other is not cls:
                raise TypeError(
                    f"suffix {suffix!r} claimed by both {other.__name__} and {cls.__name__}"
                )
        _REGISTRY.update(dict.fromkeys(cls.SUFFIXES, cls))

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def parse(cls, name: str, tensors: Mapping[str, torch.Tensor], *, source_name: str = "",
              alpha: float | None = None) -> AdapterModule | None:
        """Build the module from ``suffix -> tensor`` (kohya suffixes), or None if incomplete.

        ``alpha`` overrides a stored ``alpha`` tensor (PEFT files keep it in metadata).

        Raises:
            InvalidFileError: factor shapes that do not fit together (``describe``'s check).
        """
        raise NotImplementedError

    @classmethod
    def describe(cls, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int | None, tuple[int, ...] | None] | None:
        """``(rank, weight_shape)`` from ``suffix -> shape`` alone, or None if incomplete.

        Raises:
            InvalidFileError: (no path, no module name: the callers add them) the shapes do not fit
                together; the message names the factors and their shapes.
        """
        raise NotImplementedError

    @classmethod
    def _described(cls, name: str,
                   tensors: Mapping[str, torch.Tensor]) -> tuple[int | None, tuple[int, ...] | None] | None:
        """``describe`` on the shapes of ``tensors``, its error naming the module: ``parse``'s validation."""
        try:
            return cls.describe({k: tuple(v.shape) for k, v in tensors.items()})
        except InvalidFileError as exc:
            raise InvalidFileError(f"module {name}: {exc}") from None

    # -- maths ----------------------------------------------------------------------------
    @property
    def rank(self) -> int | None:
        """The rank alpha is divided by, or None for types without one."""
        return None

    @property
    def scale(self) -> float:
        """alpha / rank (formats-spec 1.4); 1 when alpha or rank is missing; A1111's stored
        ``scale`` overrides both."""
        if self.scale_override is not None:
            return float(self.scale_override)
        r = self.rank
        if self.alpha is None or not r:
            return 1.0
        return float(self.alpha) / r

    @property
    def needs_base(self) -> bool:
        """True when ``delta`` depends on the base weight: DoRA (any type with a ``dora_scale``), IA3."""
        return getattr(self, "dora_scale", None) is not None

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of ``delta()``: the base weight's shape, or its flattened 2-D form for conv
        factors stored flattened (LoHa/LoKr); ``reshape`` to the target (numel is equal)."""
        raise NotImplementedError

    def delta(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """Weight change in float32, scale included, user multiplier not.

        Args:
            base: the base weight; required when ``needs_base`` (reshaped to ``weight_shape``).
        Returns:
            A float32 tensor of ``weight_shape``.
        Example:
            >>> m.delta().shape == m.weight_shape
        """
        raise NotImplementedError

    def bias_delta(self) -> torch.Tensor | None:
        """Bias change in float32, or None for types that never touch the bias."""
        return None

    def tensors(self) -> dict[str, torch.Tensor]:
        """``suffix -> tensor`` as a kohya-family file stores this module."""
        raise NotImplementedError

    def directions(self, device: str = "cpu") -> Directions | None:
        """This module's delta as ranked directions in its own form (``adapters.directions``),
        computed on ``device``; None for types that resize copies unchanged (IA3, full, norm)."""
        return None

    @classmethod
    def directions_many(cls, modules: Sequence[AdapterModule], device: str = "cpu") -> list[Directions | None]:
        """``directions()`` of several modules of this type; a type overrides it where one batched
        computation beats a call per module (LoRA: one per factor shape)."""
        return [m.directions(device) for m in modules]

    # -- helpers shared by the types --------------------------------------------------------
    def _alpha_tensor(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """The ``alpha`` entry as kohya stores it; an A1111 scale override becomes ``scale * rank``
        (in float32 when the factors' dtype would round it: the alpha decides every delta)."""
        alpha = self.alpha
        if self.scale_override is not None and self.rank:
            alpha = float(self.scale_override) * self.rank
        if alpha is None:
            return {}
        import numpy as np

        if isinstance(like, np.ndarray):  # a numpy-read file (resize) gets a numpy alpha
            from loratools.io.arrays import as_numpy, scalar

            a = scalar(float(alpha), like.dtype)
            exact = float(as_numpy(a)) == alpha
            return {"alpha": a if self.scale_override is None or exact else np.array(alpha, np.float32)}
        import torch

        t = torch.tensor(float(alpha), dtype=like.dtype)
        if self.scale_override is not None and float(t) != alpha:
            t = torch.tensor(float(alpha), dtype=torch.float32)
        return {"alpha": t}

    def _finite(self, t: torch.Tensor) -> torch.Tensor:
        import torch

        if not bool(torch.isfinite(t).all()):
            raise NonFiniteError(
                f"module {self.name}: its weight delta holds NaN or Inf; the file's factors are broken "
                "(check it with `loratools check weights`)"
            )
        return t

    def _base_for(self, base: torch.Tensor | None) -> torch.Tensor:
        if base is None:
            raise ValueError(f"module {self.name} ({self.kind}) needs the base weight to compute its delta")
        shape = self.weight_shape
        if base.numel() != math.prod(shape):
            raise InvalidFileError(
                f"module {self.name}: base weight shape {tuple(base.shape)} does not fit the adapter's "
                f"{shape}; the adapter was made for another model"
            )
        return base.detach().float().reshape(shape)


@dataclass(frozen=True, eq=False, kw_only=True)
class WholeDelta(AdapterModule):
    """A weight change stored whole, plus an optional bias change, unscaled (no alpha, no rank).

    Full/diff and norm deltas differ only in their suffixes, so the maths lives here once. A
    subclass sets ``SUFFIXES = (weight suffix, bias suffix)`` and declares two fields named
    exactly like them (``diff``/``diff_b``, ``w_norm``/``b_norm``).
    """

    @classmethod
    def parse(cls, name: str, tensors: Mapping[str, torch.Tensor], *, source_name: str = "",
              alpha: float | None = None) -> WholeDelta | None:
        weight, bias = cls.SUFFIXES
        if cls._described(source_name or name, tensors) is None:
            return None
        return cls(name=name, source_name=source_name or name, **{weight: tensors[weight], bias: tensors.get(bias)})

    @classmethod
    def describe(cls, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int | None, tuple[int, ...] | None] | None:
        weight, bias = cls.SUFFIXES
        if weight not in shapes:
            return None
        w = tuple(shapes[weight])
        require_ndim(weight, w, (1, 2, 3, 4, 5))
        if bias in shapes and math.prod(shapes[bias]) != w[0]:
            raise shape_error(f"{bias} has shape {_fmt(tuple(shapes[bias]))} but {weight} {_fmt(w)} has {w[0]} rows")
        return None, w

    def _stored(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight, bias = self.SUFFIXES
        return getattr(self, weight), getattr(self, bias)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self._stored()[0].shape)

    def delta(self, base: torch.Tensor | None = None) -> torch.Tensor:
        return self._finite(self._stored()[0].detach().float())

    def bias_delta(self) -> torch.Tensor | None:
        bias = self._stored()[1]
        return None if bias is None else self._finite(bias.detach().float())

    def tensors(self) -> dict[str, torch.Tensor]:
        weight, bias = self._stored()
        return {k: t for k, t in zip(self.SUFFIXES, (weight, bias)) if t is not None}


def shape_error(problem: str) -> InvalidFileError:
    """The error ``describe`` raises: what does not fit, and that no trainer writes such a file."""
    return InvalidFileError(f"{problem}; the file is damaged or was not written by a LoRA trainer")


def _fmt(shape: tuple[int, ...]) -> str:
    return str(tuple(shape))


def require_ndim(suffix: str, shape: tuple[int, ...], allowed: tuple[int, ...]) -> None:
    """``shape`` has one of the ``allowed`` numbers of dimensions and no empty dimension."""
    if len(shape) not in allowed:
        dims = " or ".join(f"{n}-D" for n in allowed)
        raise shape_error(f"{suffix} has shape {_fmt(shape)}; a {dims} factor is expected")
    if 0 in shape:
        raise shape_error(f"{suffix} has shape {_fmt(shape)}: an empty factor")


def require_join(a: str, a_shape: tuple[int, ...], a_dim: int, b: str, b_shape: tuple[int, ...], b_dim: int,
                 what: str = "rank") -> None:
    """Dimension ``a_dim`` of one factor equals dimension ``b_dim`` of the other (the shared rank)."""
    if a_shape[a_dim] != b_shape[b_dim]:
        raise shape_error(f"{a} {_fmt(a_shape)} and {b} {_fmt(b_shape)} disagree on the {what} "
                          f"({a_shape[a_dim]} vs {b_shape[b_dim]})")


def require_shared(shapes: Mapping[str, tuple[int, ...]], weight_shape: tuple[int, ...] | None) -> None:
    """``alpha`` (and A1111's ``scale``) hold one number; ``dora_scale`` has one value per output row
    (or per input column, LyCORIS' older layout) of ``weight_shape``."""
    for key in ("alpha", "scale"):
        if key in shapes and math.prod(shapes[key]) != 1:
            raise shape_error(f"{key} has shape {_fmt(shapes[key])}; one number is expected")
    dora = shapes.get("dora_scale")
    if dora is None or weight_shape is None:
        return
    n, out = math.prod(dora), weight_shape[0]
    if not ((dora and dora[0] == out and n == out) or (len(weight_shape) > 1 and n == weight_shape[1])):
        raise shape_error(f"dora_scale has shape {_fmt(dora)}, which fits neither the {out} output rows nor the "
                          f"input columns of the weight {_fmt(weight_shape)}")


def read_alpha(t: torch.Tensor | np.ndarray) -> float:
    """Alpha as stored: 0-d or (1,), any dtype (formats-spec 1.7); bf16 values kept as is. A numpy
    array (``resize`` reads LoRAs without torch) is read as it is."""
    from loratools.io.arrays import as_numpy

    return float(as_numpy(t).reshape(-1)[0])


def apply_dora(module: AdapterModule, base: torch.Tensor, diff: torch.Tensor,
               dora_scale: torch.Tensor) -> torch.Tensor:
    """DoRA at multiplier 1 (LyCORIS semantics, formats-spec 1.5): ``V*m/(|V|+eps) - W``.

    ``V = W + diff``. The norm axis comes from ``dora_scale``'s shape: output rows when its
    first dimension equals out (``(out, 1[, 1, 1])`` or PEFT's ``(out,)``), otherwise input
    columns (``(1, in[, 1, 1])``, LyCORIS <= 3.1 and early ComfyUI).
    """
    import torch

    w = module._base_for(base)
    v = w + diff
    eps = torch.finfo(torch.float32).eps
    m = dora_scale.detach().float()
    out = v.shape[0]
    if m.shape[0] == out and (m.numel() == out):
        norm = v.reshape(out, -1).norm(dim=1).reshape(out, *([1] * (v.dim() - 1)))
        factor = m.reshape(norm.shape) / (norm + eps)
    else:
        cin = v.shape[1]
        norm = v.transpose(0, 1).reshape(cin, -1).norm(dim=1)
        shape = (1, cin, *([1] * (v.dim() - 2)))
        factor = m.reshape(shape) / (norm.reshape(shape) + eps)
    return v * factor - w

"""safetensors dtype names <-> torch dtypes, item sizes and the on-disk tensor order.

Kept free of a module-level torch import: the header reader (and so ``metadata show``) needs the
item sizes and names only, and must not pay torch's import time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: Bytes per element of every dtype safetensors defines that torch can hold.
ITEM_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "F64": 8, "I64": 8, "U64": 8,
}

# safetensors writes tensors sorted by its Rust ``Dtype`` enum, largest first, then by name; the
# enum order is BOOL < U8 < I8 < F8_E5M2 < F8_E4M3 < I16 < U16 < F16 < BF16 < I32 < U32 < F32 < F64
# < I64 < U64. Matching it makes our files byte-identical to ``safetensors.torch.save`` and keeps
# every tensor aligned to its item size.
_ENUM_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16",
               "I32", "U32", "F32", "F64", "I64", "U64")
ORDER_RANK: dict[str, int] = {name: i for i, name in enumerate(_ENUM_ORDER)}

_TORCH_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn",
    "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16",
    "I32": "int32", "U32": "uint32", "F32": "float32", "F64": "float64", "I64": "int64", "U64": "uint64",
}


#: The precision names users type (``--dtype``, ``--save_precision``, resize recipes) -> torch dtype names.
PRECISION_NAMES: dict[str, str] = {
    "fp16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp32": "float32", "float32": "float32", "float": "float32",
}


def parse_dtype_name(name: str | None, *, option: str = "--dtype") -> torch.dtype | None:
    """The torch dtype a user-typed precision name means (case and spaces ignored); None stays None.

    One table for every command that takes a precision, so ``merge --dtype bf16`` and
    ``resize --dtype bf16`` accept the same spellings.

    Raises:
        UsageError: an unknown name; the message names ``option`` and the accepted names.
    Example:
        >>> parse_dtype_name("BF16")
        torch.bfloat16
    """
    stored = parse_precision(name, option=option)
    return None if stored is None else to_torch(stored)


def parse_precision(name: str | None, *, option: str = "--dtype") -> str | None:
    """``parse_dtype_name`` as a safetensors dtype name ("bf16" -> "BF16"), without importing torch."""
    if name is None:
        return None
    key = name.strip().lower()
    if key not in PRECISION_NAMES:
        from loratools.errors import UsageError

        raise UsageError(f"{option} {name!r} is not a known precision; use fp16, bf16 or fp32 "
                         f"(also: {', '.join(n for n in PRECISION_NAMES if n not in ('fp16', 'bf16', 'fp32'))})")
    return from_torch(PRECISION_NAMES[key])


def item_size(dtype: str) -> int:
    """Bytes per element of safetensors dtype ``dtype`` (KeyError for unknown names)."""
    return ITEM_SIZES[dtype]


def to_torch(dtype: str) -> torch.dtype:
    """The torch dtype for a safetensors dtype name such as ``"F16"``."""
    import torch

    return getattr(torch, _TORCH_NAMES[dtype])


def from_torch(dtype: Any) -> str:
    """The safetensors name of a torch dtype, a numpy dtype (``resize`` writes numpy arrays) or a
    safetensors name itself; ValueError for dtypes safetensors cannot store."""
    if isinstance(dtype, str) and dtype in _TORCH_NAMES:
        return dtype
    tag = (getattr(dtype, "metadata", None) or {}).get("safetensors")  # io.arrays' BF16 bits
    if tag is not None:
        return tag
    name = str(dtype).removeprefix("torch.")
    for st_name, torch_name in _TORCH_NAMES.items():
        if torch_name == name:
            return st_name
    raise ValueError(f"dtype {dtype} cannot be stored in a safetensors file")


def sort_key(name: str, dtype: str) -> tuple[int, str]:
    """Position of a tensor in a safetensors file: larger dtypes first, then by name."""
    return (-ORDER_RANK[dtype], name)

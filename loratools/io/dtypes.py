"""safetensors dtype names <-> torch dtypes, item sizes and the on-disk tensor order.

Kept free of a module-level torch import: the header reader (and so ``metadata show``) needs the
item sizes and names only, and must not pay torch's import time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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


def item_size(dtype: str) -> int:
    """Bytes per element of safetensors dtype ``dtype`` (KeyError for unknown names)."""
    return ITEM_SIZES[dtype]


def to_torch(dtype: str) -> torch.dtype:
    """The torch dtype for a safetensors dtype name such as ``"F16"``."""
    import torch

    return getattr(torch, _TORCH_NAMES[dtype])


def from_torch(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype; ValueError for dtypes safetensors cannot store."""
    name = str(dtype).removeprefix("torch.")
    for st_name, torch_name in _TORCH_NAMES.items():
        if torch_name == name:
            return st_name
    raise ValueError(f"dtype {dtype} cannot be stored in a safetensors file")


def sort_key(name: str, dtype: str) -> tuple[int, str]:
    """Position of a tensor in a safetensors file: larger dtypes first, then by name."""
    return (-ORDER_RANK[dtype], name)

"""numpy arrays of tensor data, whichever library read it.

``resize`` works on numpy so that a LoRA file can be resized without importing torch (1.1-1.5 s,
more than half of a warm run); other commands and the LoHa/LoKr maths hand it torch tensors. These
helpers take either without importing torch for a numpy array.

numpy has no bfloat16: BF16 data is held as its uint16 bits under ``BF16``, a uint16 dtype whose
metadata names it, so the writer stores those bits as BF16 again (``io.dtypes.from_torch`` reads
the tag) and ``as_numpy`` widens them to float32 exactly (bfloat16 is the top half of a float32).
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: safetensors dtype names numpy holds natively (float8 it does not; BF16 is tagged uint16 bits).
NUMPY_DTYPES: dict[str, Any] = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8,
                                "U8": np.uint8, "I16": np.int16, "U16": np.uint16, "I32": np.int32,
                                "U32": np.uint32, "I64": np.int64, "U64": np.uint64, "BOOL": np.bool_}
#: bfloat16 bits as numpy holds them: uint16, tagged.
BF16 = np.dtype(np.uint16, metadata={"safetensors": "BF16"})


def numpy_dtype(name: str) -> np.dtype | None:
    """The numpy dtype that holds safetensors dtype ``name`` (BF16: tagged bits), or None (float8)."""
    return BF16 if name == "BF16" else (np.dtype(NUMPY_DTYPES[name]) if name in NUMPY_DTYPES else None)


def is_bf16(a: np.ndarray) -> bool:
    return (a.dtype.metadata or {}).get("safetensors") == "BF16"


def as_numpy(t: Any) -> np.ndarray:
    """``t``'s values as a numpy array: itself, tagged BF16 bits widened to float32, or a CPU torch
    tensor's data (bfloat16/float8 widened to float32, exactly; other dtypes shared, not copied)."""
    if isinstance(t, np.ndarray):
        if is_bf16(t):
            wide = t.reshape(-1).view(np.uint16).astype(np.uint32) << 16  # 1-d: numpy turns 0-d results into scalars
            return wide.view(np.float32).reshape(t.shape)
        return t
    import torch

    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        t = t.float()
    return t.numpy()


def all_finite(t: Any) -> bool:
    """No NaN or Inf in ``t`` (numpy array or torch tensor; non-float data is always finite)."""
    a = as_numpy(t)
    return not np.issubdtype(a.dtype, np.floating) or a.size == 0 or bool(np.isfinite(a).all())


def cast(a: np.ndarray, dtype: str) -> np.ndarray:
    """``a`` (float32/64) stored as safetensors dtype ``dtype``; "BF16" rounds to nearest-even, as
    torch's own cast does (a value past bfloat16's range becomes Inf, which the caller refuses)."""
    if dtype != "BF16":
        return a.astype(NUMPY_DTYPES[dtype])
    shape = np.shape(a)
    bits = np.array(a, dtype=np.float32).reshape(-1).view(np.uint32)  # 1-d: numpy turns 0-d results into scalars
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    return rounded.astype(np.uint16).view(BF16).reshape(shape)


def scalar(value: float, dtype: np.dtype) -> np.ndarray:
    """A 0-d array of ``value`` in ``dtype`` (a numpy dtype or tagged BF16)."""
    if (dtype.metadata or {}).get("safetensors") == "BF16":
        return cast(np.array(value, dtype=np.float32), "BF16")
    return np.array(value, dtype=dtype)

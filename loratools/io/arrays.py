"""numpy arrays of tensor data, whichever library read it.

``resize`` works on numpy so that a LoRA file can be resized without importing torch (1.1-1.5 s,
more than half of a warm run); other commands and the LoHa/LoKr maths hand it torch tensors. These
helpers take either without importing torch for a numpy array.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: safetensors dtype names numpy holds natively (bfloat16 and float8 it does not).
NUMPY_DTYPES: dict[str, Any] = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8,
                                "U8": np.uint8, "I16": np.int16, "U16": np.uint16, "I32": np.int32,
                                "U32": np.uint32, "I64": np.int64, "U64": np.uint64, "BOOL": np.bool_}


def as_numpy(t: Any) -> np.ndarray:
    """``t`` as a numpy array: itself, or a CPU torch tensor's data (bfloat16/float8 widened to
    float32, exactly; other dtypes shared, not copied)."""
    if isinstance(t, np.ndarray):
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


def cast(a: np.ndarray, dtype: str) -> Any:
    """``a`` (float32/64) stored as safetensors dtype ``dtype``: a numpy array, or for "BF16" (no
    numpy dtype) a torch tensor, rounded to nearest-even as torch's own cast does."""
    if dtype in NUMPY_DTYPES:
        return a.astype(NUMPY_DTYPES[dtype])
    import torch

    from loratools.io.dtypes import to_torch

    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(to_torch(dtype))

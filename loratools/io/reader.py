"""Lazy, read-only access to the tensors of a safetensors file.

``open_safetensors`` reads the header once; each tensor is materialised from a memory map only when
it is looked up, so an operation touching one layer of a 7 GB checkpoint reads that layer alone.
Tensors share the (copy-on-write) mapping: writing into one never changes the file.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from loratools.errors import InvalidFileError
from loratools.io.dtypes import item_size, to_torch
from loratools.io.header import SafetensorsHeader, TensorInfo, read_header
from loratools.io.paths import os_problem

if TYPE_CHECKING:
    import numpy as np
    import torch


class SafetensorsReader(Mapping[str, "torch.Tensor"]):
    """A read-only ``Mapping[str, Tensor]`` over one safetensors file (keys in file order).

    ``numpy=True`` gives numpy arrays instead, and never imports torch (``resize`` of a LoRA:
    torch's import is more than half of a warm run); BF16 comes as tagged uint16 bits
    (``io.arrays``), and a float8 tensor, which numpy cannot hold, is refused with ValueError
    (``numpy_readable`` says beforehand).
    """

    def __init__(self, header: SafetensorsHeader, *, numpy: bool = False) -> None:
        self.header = header
        self.numpy = numpy
        self._mm: mmap.mmap | None = None

    @property
    def path(self) -> Path:
        return self.header.path

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    def info(self, key: str) -> TensorInfo:
        """Dtype, shape and byte range of ``key`` without reading its data."""
        return self.header.tensors[key]

    def key_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every key's shape, from the header alone."""
        return {k: t.shape for k, t in self.header.tensors.items()}

    def __len__(self) -> int:
        return len(self.header.tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self.header.tensors)

    def __contains__(self, key: object) -> bool:
        return key in self.header.tensors

    def __getitem__(self, key: str) -> torch.Tensor:
        if self.numpy:
            return self._array(key)
        import torch

        info = self.header.tensors[key]
        dtype = to_torch(info.dtype)
        if info.numel == 0:
            return torch.empty(info.shape, dtype=dtype)
        mm = self._map()
        start = self.header.data_offset + info.begin
        if start % item_size(info.dtype):  # unaligned (hand-made files): copy rather than map
            return torch.frombuffer(bytearray(mm[start:start + info.nbytes]), dtype=dtype).reshape(info.shape)
        return torch.frombuffer(mm, dtype=dtype, count=info.numel, offset=start).reshape(info.shape)

    def _array(self, key: str) -> np.ndarray:
        import numpy as np

        from loratools.io.arrays import numpy_dtype

        info = self.header.tensors[key]
        dtype = numpy_dtype(info.dtype)
        if dtype is None:
            raise ValueError(f"{key}: {info.dtype} has no numpy dtype; open the file without numpy=True")
        if info.numel == 0:
            return np.empty(info.shape, dtype=dtype)
        mm = self._map()
        start = self.header.data_offset + info.begin
        if start % item_size(info.dtype):  # unaligned (hand-made files): copy rather than map
            return np.frombuffer(bytearray(mm[start:start + info.nbytes]), dtype=dtype).reshape(info.shape)
        return np.frombuffer(mm, dtype=dtype, count=info.numel, offset=start).reshape(info.shape)

    def release(self, key: str) -> None:
        """Drop ``key``'s pages from this process's view of the file, after its tensor is no longer used.

        The file is mapped whole; every page a read touched stays in the process's resident set
        until unmapped, so streaming a 7 GB checkpoint through the reader would end with all of it
        counted as resident (clean file pages, reclaimable, but that is what users see in a task
        manager). ``MADV_DONTNEED`` on this private mapping discards the pages (they stay in the page
        cache; a later read of ``key`` maps them again, with the file's bytes). In-place writes to
        tensors on those pages (copy-on-write, never the file) are discarded with them.
        A no-op where ``madvise`` is unavailable (Windows, Python without it), before anything was
        read, and for empty tensors.
        """
        info = self.header.tensors[key]
        mm = self._mm
        if mm is None or info.nbytes == 0 or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = self.header.data_offset + info.begin
        aligned = start - start % mmap.PAGESIZE
        mm.madvise(mmap.MADV_DONTNEED, aligned, self.header.data_offset + info.end - aligned)

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            try:
                with open(self.path, "rb") as fh:
                    if fh.seek(0, 2) != self.header.file_size:
                        raise InvalidFileError("file changed size since its header was read; re-run",
                                               path=self.path)
                    self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            except OSError as exc:
                raise InvalidFileError(f"cannot map file for reading ({os_problem(exc, self.path)})",
                                       path=self.path) from None
        return self._mm

    def __repr__(self) -> str:
        return f"SafetensorsReader({str(self.path)!r}, {len(self)} tensors)"


def open_safetensors(path: str | Path, *, numpy: bool = False) -> SafetensorsReader:
    """Open a safetensors file lazily.

    Args:
        path: the ``.safetensors`` file.
        numpy: numpy arrays instead of torch tensors (see ``SafetensorsReader``).
    Returns:
        A read-only Mapping of tensor name to tensor; ``.metadata``, ``.header``, ``.info(key)``.
    Raises:
        InvalidFileError: the file is missing or malformed (checked before anything is returned).
    Example:
        >>> sd = open_safetensors("lora.safetensors"); sd["lora_unet_conv_in.alpha"]
    """
    return SafetensorsReader(read_header(path), numpy=numpy)


def numpy_readable(header: SafetensorsHeader) -> bool:
    """Every tensor of the file has a numpy dtype (no float8), so ``numpy=True`` can read it."""
    from loratools.io.arrays import numpy_dtype

    return all(numpy_dtype(t.dtype) is not None for t in header.tensors.values())


_STRUCT_CODES = {"F16": "e", "F32": "f", "F64": "d", "I8": "b", "U8": "B", "I16": "h", "U16": "H",
                 "I32": "i", "U32": "I", "I64": "q", "U64": "Q", "BOOL": "?"}


def read_scalars(header: SafetensorsHeader, keys: list[str]) -> dict[str, float]:
    """Values of one-element tensors (alphas) read with plain file I/O, without importing torch.

    A header-only summary of a multi-GB file needs every module's alpha: a few bytes each, so
    this seeks to each one instead of mapping or loading anything. Keys that are not one-element
    tensors of a numeric dtype are left out of the result.
    """
    import struct

    out: dict[str, float] = {}
    try:
        with open(header.path, "rb", buffering=0) as fh:  # unbuffered: read those bytes, not 8 KiB each
            for key in keys:
                info = header.tensors.get(key)
                if info is None or info.numel != 1:
                    continue
                fh.seek(header.data_offset + info.begin)
                raw = fh.read(info.nbytes)
                if info.dtype == "BF16":
                    out[key] = struct.unpack("<f", b"\x00\x00" + raw)[0]
                elif info.dtype in _STRUCT_CODES:
                    out[key] = float(struct.unpack("<" + _STRUCT_CODES[info.dtype], raw)[0])
    except OSError as exc:
        raise InvalidFileError(f"cannot read file ({os_problem(exc, header.path)})", path=header.path) from None
    return out

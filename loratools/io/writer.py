"""Streaming, atomic safetensors writer: the only code in loratools that creates model files.

Tensors are produced and written one at a time (a 7 GB merge never sits in RAM) in safetensors'
own order, into a temporary file in the target folder that is fsynced and renamed over the target
only when complete; any failure removes it. An existing output is refused unless ``overwrite``; an
input (``protected``) is refused always, because the reader may still be mapping it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from loratools.errors import OutputExistsError, UsageError
from loratools.io.dtypes import from_torch
from loratools.io.hashes import SshsHasher, autov2, file_sha256, ss_only
from loratools.io.header import data_layout, encode_header

if TYPE_CHECKING:
    import torch

SSHS_KEYS = ("sshs_model_hash", "sshs_legacy_hash")
_PLACEHOLDER = {"sshs_model_hash": "0" * 64, "sshs_legacy_hash": "0" * 8}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name, the dtype it is stored in, and its shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class WrittenFile:
    """What was written. ``sha256`` was computed while streaming when the writer was asked to
    (``sha256=True``) and the header was final up front; otherwise it is computed by reading the
    file back on first access, so it is always correct and only its cost differs."""

    path: Path
    size: int
    metadata: dict[str, str]
    sshs_model_hash: str | None = None
    sshs_legacy_hash: str | None = None
    _sha256: str | None = field(default=None, repr=False)

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    @property
    def autov2(self) -> str:
        return autov2(self.sha256)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def check_output_path(path: str | Path, *, overwrite: bool = False, protected: Iterable[str | Path] = ()) -> Path:
    """Refuse an output that is an input, an existing file (without ``overwrite``) or unwritable.

    Called by the writer, and by operations before any expensive work so the user hears at once.
    """
    out = Path(path)
    for p in protected:
        if _same_file(out, Path(p)):
            raise OutputExistsError("output is one of the input files; write to another path "
                                    "(inputs are never overwritten)", path=out)
    if out.is_dir():
        raise OutputExistsError("output is a directory; give a file name", path=out)
    if out.exists() and not overwrite:
        raise OutputExistsError("output exists; pass --overwrite to replace it", path=out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"output folder {parent} does not exist; create it first", path=out)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to folder {parent} (permission denied); choose another output",
                         path=out)
    return out


def _check_metadata(metadata: Mapping[str, str]) -> None:
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise UsageError(f"metadata {k!r}={v!r}: safetensors metadata keys and values must be strings")


def _as_bytes(t: torch.Tensor) -> memoryview:
    import torch

    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def write_safetensors(path: str | Path, specs: Iterable[TensorSpec], produce: Callable[[str], torch.Tensor],
                      metadata: Mapping[str, str] | None = None, *, overwrite: bool = False,
                      protected: Iterable[str | Path] = (), sshs_hashes: bool = False,
                      sha256: bool = False) -> WrittenFile:
    """Stream tensors into a new safetensors file, atomically.

    Args:
        path: output file.
        specs: every tensor's name, stored dtype and shape (the header is written first).
        produce: called once per name, in file order; must return a tensor of exactly that dtype
            and shape. It may compute the tensor (a merge) or read it lazily (a copy).
        metadata: string metadata; ``None`` writes no ``__metadata__`` entry.
        overwrite: replace an existing output.
        protected: input paths; the output may never be one of them, even with ``overwrite``.
        sshs_hashes: (re)compute ``sshs_model_hash``/``sshs_legacy_hash`` as sd-scripts does; stale
            values in ``metadata`` are replaced.
        sha256: hash the whole file while streaming, for a caller that will read ``.sha256`` /
            ``.autov2`` (about a fifth of a merge's CPU time, so not done by default; without it the
            property reads the file back). Ignored with ``sshs_hashes``: the header is patched after
            the data, so the hash has to be taken from the finished file anyway.
    Returns:
        ``WrittenFile`` with size, final metadata and hashes.
    Raises:
        OutputExistsError, UsageError: the output path is not acceptable (nothing is written).
    Example:
        >>> write_safetensors("out.safetensors", [TensorSpec("w", torch.float16, (4, 4))],
        ...                   lambda name: torch.zeros(4, 4, dtype=torch.float16))
    """
    protected = list(protected)
    out = check_output_path(path, overwrite=overwrite, protected=protected)
    layout = data_layout((s.name, from_torch(s.dtype), s.shape) for s in specs)
    meta = None if metadata is None else dict(metadata)
    hasher = None
    if meta is not None:
        _check_metadata(meta)
    if sshs_hashes:
        meta = {k: v for k, v in (meta or {}).items() if k not in SSHS_KEYS}
        hasher = SshsHasher(encode_header(layout, ss_only(meta)))
        meta.update(_PLACEHOLDER)
    header = encode_header(layout, meta)
    full = hashlib.sha256(header) if sha256 and not sshs_hashes else None

    try:
        fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    except OSError as exc:
        raise UsageError(f"cannot create a file in {out.parent} ({exc.strerror}); choose another output",
                         path=out) from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(header)
            for name, dt, shape, begin, end in layout:
                t = produce(name)
                if from_torch(t.dtype) != dt or tuple(t.shape) != shape:
                    raise ValueError(f"tensor {name!r}: produced {t.dtype} {tuple(t.shape)}, "
                                     f"declared {dt} {shape}")
                buf = _as_bytes(t)
                fh.write(buf)
                for h in (hasher, full):
                    if h is not None:
                        h.update(buf)
                del t, buf
            if hasher is not None and meta is not None:
                model_hash, legacy_hash = hasher.result()
                for key, value in (("sshs_model_hash", model_hash), ("sshs_legacy_hash", legacy_hash)):
                    fh.seek(header.index(f'"{key}":"{_PLACEHOLDER[key]}"'.encode()) + len(key) + 4)
                    fh.write(value.encode())
                    meta[key] = value
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if out.exists() and any(_same_file(out, Path(p)) for p in protected):  # appeared meanwhile
            raise OutputExistsError("output became one of the inputs; refusing to replace it", path=out)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(out.parent)
    return WrittenFile(out, len(header) + (layout[-1][4] if layout else 0), meta or {},
                       meta.get("sshs_model_hash") if sshs_hashes and meta else None,
                       meta.get("sshs_legacy_hash") if sshs_hashes and meta else None,
                       full.hexdigest() if full is not None else None)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable; not every filesystem allows opening a folder, which is fine."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                 **kwargs: object) -> WrittenFile:
    """Write a Mapping of tensors (in memory or lazy) through ``write_safetensors``.

    Example:
        >>> save_tensors("lora.safetensors", {"x.alpha": torch.tensor(4.0)}, {"ss_network_dim": "8"})
    """
    return write_safetensors(path, tensor_specs(tensors), tensors.__getitem__, metadata, **kwargs)  # type: ignore[arg-type]


def tensor_specs(tensors: Mapping[str, torch.Tensor]) -> list[TensorSpec]:
    """Specs of a Mapping; for a lazy safetensors reader they come from its header (no data read)."""
    from loratools.io.dtypes import to_torch
    from loratools.io.reader import SafetensorsReader

    if isinstance(tensors, SafetensorsReader):
        return [TensorSpec(k, to_torch(i.dtype), i.shape) for k, i in tensors.header.tensors.items()]
    return [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]

"""Streaming, atomic safetensors writer: the only code in loratools that creates model files.

Tensors are produced and written one at a time (a 7 GB merge never sits in RAM) in safetensors'
own order, into ``.<name>.loratools-partial`` in the target folder (``claim.py``: held under a lock,
so a second writer of the same output is refused and a killed run's leftover is removed by the
next run), fsynced and renamed onto the target only when complete; any failure, Ctrl-C, SIGTERM or
SIGHUP removes it. An existing output is refused unless ``overwrite``; an input (``protected``) is
refused always, because the reader may still be mapping it. A full disk is one error naming the
folder and the bytes the file needs, checked before the first byte and again on every write.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from loratools.errors import DiskFullError, OutputExistsError, UsageError, WriteError
from loratools.io.claim import Claim, claim, clear_stale
from loratools.io.dtypes import from_torch
from loratools.io.hashes import SshsHasher, autov2, file_sha256, ss_only
from loratools.io.header import data_layout, encode_header
from loratools.io.paths import os_problem

if TYPE_CHECKING:
    import numpy as np
    import torch

SSHS_KEYS = ("sshs_model_hash", "sshs_legacy_hash")
_PLACEHOLDER = {"sshs_model_hash": "0" * 64, "sshs_legacy_hash": "0" * 8}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name, the dtype it is stored in (a torch or numpy dtype, or a
    safetensors name such as "F16"), and its shape."""

    name: str
    dtype: torch.dtype | np.dtype | str
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
    except OSError:  # one does not exist (or is a link loop): the same path spelled two ways?
        try:
            return a.resolve() == b.resolve()
        except (OSError, RuntimeError):  # RuntimeError: a symbolic link loop (Python < 3.13)
            return os.path.abspath(a) == os.path.abspath(b)


def check_output_path(path: str | Path, *, overwrite: bool = False, protected: Iterable[str | Path] = ()) -> Path:
    """Refuse an output that is an input, an existing file (without ``overwrite``), unwritable, or
    being written by another process right now; remove a stale temporary file a killed run left.

    Called by the writer, and by operations before any expensive work so the user hears at once.
    """
    out = Path(path)
    for p in protected:
        if _same_file(out, Path(p)):
            raise OutputExistsError("output is one of the input files; write to another path "
                                    "(inputs are never overwritten)", path=out)
    if out.is_dir():
        raise OutputExistsError("output is a directory; give a file name", path=out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"output folder {parent} does not exist; create it first", path=out)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to folder {parent} (permission denied); choose another output",
                         path=out)
    clear_stale(out)
    if os.path.lexists(out) and not overwrite:
        raise OutputExistsError("output exists; pass --overwrite to replace it", path=out)
    return out


def need_space(out: Path, size: int) -> None:
    """Refuse before writing when ``out``'s folder cannot hold ``size`` more bytes (an old output being
    replaced still occupies its space until the rename). ``out`` may be a file or a folder to create."""
    try:
        free = shutil.disk_usage(out.parent).free
    except OSError:
        return
    if free < size:
        raise disk_full(out, size, free)


def disk_full(out: Path, size: int, free: int | None = None) -> DiskFullError:
    """The one error for a full disk: the folder, what ``out`` needs, what is free (when known)."""
    have = "" if free is None else f", {_bytes(free)} free"
    return DiskFullError(f"not enough space to write {out.name}: it needs {_bytes(size)}{have}; free some space "
                         "or choose another output folder", path=out.parent if str(out.parent) else ".")


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


def _check_metadata(metadata: Mapping[str, str]) -> None:
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise UsageError(f"metadata {k!r}={v!r}: safetensors metadata keys and values must be strings")


def _as_bytes(t: torch.Tensor | np.ndarray) -> memoryview:
    """The bytes of a torch tensor or a numpy array (``resize`` writes numpy: no torch import)."""
    import numpy as np

    if isinstance(t, np.ndarray):
        return memoryview(np.ascontiguousarray(t).reshape(-1).view(np.uint8)).cast("B")
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
        OutputBusyError: another process is writing the same output now.
        DiskFullError, WriteError: the folder has too little space, or the system failed a write
            (the temporary file is removed; an existing output is untouched).
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

    size = len(header) + (layout[-1][4] if layout else 0)
    producing = False
    held = _claim(out, size)
    try:
        held.arm()  # a Ctrl-C/SIGTERM that came while claiming is raised here, where abandon() runs
        need_space(out, size)
        with os.fdopen(os.dup(held.fd), "wb") as fh:  # the claim's own fd keeps the lock until the rename
            fh.write(header)
            for name, dt, shape, begin, end in layout:
                producing = True
                t = produce(name)
                producing = False
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
        os.chmod(held.path, 0o666 & ~umask)
        if out.exists() and any(_same_file(out, Path(p)) for p in protected):  # appeared meanwhile
            raise OutputExistsError("output became one of the inputs; refusing to replace it", path=out)
    except OSError as exc:
        held.abandon()
        if producing:  # reading an input failed: that error is the input's, not the output's
            raise
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(out, size) from None
        raise WriteError(f"cannot write {out.name}: {os_problem(exc)}", path=out) from None
    except BaseException:
        held.abandon()
        raise
    try:
        held.finish(overwrite=overwrite)
    except OSError as exc:
        raise WriteError(f"cannot rename the finished file onto {out.name}: {os_problem(exc)}", path=out) from None
    _fsync_dir(out.parent)
    return WrittenFile(out, size, meta or {},
                       meta.get("sshs_model_hash") if sshs_hashes and meta else None,
                       meta.get("sshs_legacy_hash") if sshs_hashes and meta else None,
                       full.hexdigest() if full is not None else None)


def _claim(out: Path, size: int) -> Claim:
    try:
        return claim(out)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(out, size) from None
        raise UsageError(f"cannot create a file in {out.parent} ({os_problem(exc)}); choose another output",
                         path=out) from None


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

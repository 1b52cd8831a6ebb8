"""The safetensors header: read and validate it without touching tensor data, and encode one.

A safetensors file is ``u64 little-endian N`` + ``N`` bytes of JSON + the data section. The JSON maps
each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data
section) plus an optional ``"__metadata__"`` map of strings. Everything here is plain Python (no
torch), so ``metadata show`` on a multi-GB file reads a few kilobytes and starts instantly.

Validation follows the reference implementation: any inconsistency raises ``InvalidFileError`` with
one line naming the file and the problem, never a raw ``json``/``struct`` traceback.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from loratools.errors import InvalidFileError
from loratools.io.dtypes import ITEM_SIZES, sort_key
from loratools.io.paths import os_problem

#: The reference implementation refuses headers above 100 MB; so do we (a corrupt length field
#: must not make us allocate gigabytes).
MAX_HEADER_SIZE = 100_000_000
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: dtype name (``"F16"``), shape, byte range in the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header. ``tensors`` keeps file order; ``data_offset`` = 8 + header length."""

    path: Path
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    data_offset: int
    file_size: int
    has_metadata: bool = field(default=False)

    @property
    def data_size(self) -> int:
        return self.file_size - self.data_offset


def _fail(path: str | Path, problem: str) -> InvalidFileError:
    return InvalidFileError(problem, path=path)


def directory_hint(folder: Path) -> str:
    """What to pass instead of a folder: the .safetensors files in it (diffusers/PEFT trainers
    save ``pytorch_lora_weights.safetensors`` or ``adapter_model.safetensors`` in a folder)."""
    try:
        files = sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors")
    except OSError:
        files = []
    if not files:
        return "pass a file, not a folder"
    shown = ", ".join(str(folder / f) for f in files[:3]) + (f" (+{len(files) - 3} more)" if len(files) > 3 else "")
    return f"pass the file inside it: {shown}"


def read_header(path: str | Path) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file, reading no tensor data.

    Args:
        path: the ``.safetensors`` file.
    Returns:
        The header (metadata, tensor layout, offsets, file size).
    Raises:
        InvalidFileError: missing, a directory, truncated, not safetensors, or inconsistent.
    Example:
        >>> read_header("lora.safetensors").metadata.get("ss_network_dim")
    """
    p = Path(path)
    if p.is_dir():
        raise _fail(p, f"is a directory, not a .safetensors file; {directory_hint(p)}")
    try:
        with open(p, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 8:
                raise _fail(p, f"file is {size} bytes, too short for a safetensors header (needs at least 8); "
                               "the file is empty or truncated")
            first = fh.read(9)
            if first[8:9] != b"{":  # every safetensors header is a JSON object right after the length
                if first.startswith(b"PK\x03\x04") or first[:1] == b"\x80":
                    raise _fail(p, "is a PyTorch checkpoint (zip/pickle), not safetensors; commands that take "
                                   ".ckpt/.pt read it directly, or convert it to .safetensors first")
                if len(first) == 9:
                    _check_length(p, struct.unpack("<Q", first[:8])[0], size)
                    raise _fail(p, "header does not start with '{'; not a safetensors file")
            (n,) = struct.unpack("<Q", first[:8])
            _check_length(p, n, size)
            raw = first[8:] + fh.read(n - 1) if n else b""
    except IsADirectoryError:
        raise _fail(p, "is a directory, not a .safetensors file") from None
    except OSError as exc:
        raise _fail(p, os_problem(exc, p)) from None
    key = (str(p), size)
    hit = _PARSED.get(key)
    if hit is not None and hit[0] == raw:
        return hit[1]
    header = parse_header(raw, size, p)
    _PARSED[key] = (raw, header)
    while len(_PARSED) > _PARSED_MAX:
        _PARSED.pop(next(iter(_PARSED)))
    return header


#: The last few headers parsed, keyed by path and size and checked against the header bytes just
#: read (so a changed file is parsed again): a command reads a checkpoint's header to recognise
#: it and again to open it, and validating 2500 entries costs more than reading them.
_PARSED: dict[tuple[str, int], tuple[bytes, SafetensorsHeader]] = {}
_PARSED_MAX = 8


def _check_length(path: str | Path, n: int, size: int) -> None:
    if n > MAX_HEADER_SIZE:
        raise _fail(path, f"header length field says {n} bytes (limit {MAX_HEADER_SIZE}); "
                          "not a safetensors file or corrupted")
    if 8 + n > size:
        raise _fail(path, f"header length {n} runs past the end of the {size}-byte file; "
                          "truncated download or not a safetensors file")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def parse_header(raw: bytes, file_size: int, path: str | Path = "<bytes>") -> SafetensorsHeader:
    """Validate the JSON header bytes ``raw`` of a file of ``file_size`` bytes.

    Split from ``read_header`` so the same checks run on bytes in memory (fuzzing, the writer's
    self-check). Raises ``InvalidFileError`` for every malformed input.
    """
    n = len(raw)
    _check_length(path, n, file_size)
    if not raw.startswith(b"{"):
        raise _fail(path, "header does not start with '{'; not a safetensors file")
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as exc:
        raise _fail(path, f"header is not valid UTF-8 (byte {exc.start}); file corrupted") from None
    except RecursionError:
        raise _fail(path, "header JSON is nested too deeply; file corrupted") from None
    except ValueError as exc:
        raise _fail(path, f"header is not valid JSON ({exc}); file corrupted or not safetensors") from None
    if not isinstance(doc, dict):
        raise _fail(path, "header JSON is not an object; not a safetensors file")

    metadata: dict[str, str] = {}
    has_metadata = METADATA_KEY in doc
    raw_meta = doc.pop(METADATA_KEY, None)
    if raw_meta is not None:
        if not isinstance(raw_meta, dict) or not all(isinstance(v, str) for v in raw_meta.values()):
            raise _fail(path, "__metadata__ must map strings to strings; file corrupted")
        metadata = raw_meta

    data_size = file_size - 8 - n
    tensors = {name: _tensor_info(path, name, entry, data_size) for name, entry in doc.items()}
    _check_layout(path, tensors, data_size)
    return SafetensorsHeader(Path(path), metadata, tensors, 8 + n, file_size, has_metadata)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _tensor_info(path: str | Path, name: str, entry: object, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _fail(path, f"tensor {name!r}: entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEM_SIZES:
        raise _fail(path, f"tensor {name!r}: unknown dtype {dtype!r} "
                          f"(known: {', '.join(sorted(ITEM_SIZES))})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _fail(path, f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise _fail(path, f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    if end > data_size:
        raise _fail(path, f"tensor {name!r}: data_offsets [{begin}, {end}] run past the end of the "
                          f"{data_size}-byte data section; file truncated")
    info = TensorInfo(name, dtype, tuple(shape), begin, end)
    expected = info.numel * ITEM_SIZES[dtype]
    if expected != end - begin:
        raise _fail(path, f"tensor {name!r}: shape {list(shape)} of {dtype} needs {expected} bytes "
                          f"but data_offsets span {end - begin}; file corrupted")
    return info


def _check_layout(path: str | Path, tensors: Mapping[str, TensorInfo], data_size: int) -> None:
    """Tensors must tile the data section exactly: no overlap, no gap, nothing after the last."""
    pos = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin < pos:
            raise _fail(path, f"tensor {info.name!r}: data_offsets [{info.begin}, {info.end}] overlap "
                              "another tensor; file corrupted")
        if info.begin > pos:
            raise _fail(path, f"tensor {info.name!r}: gap of {info.begin - pos} bytes before its data; "
                              "file corrupted")
        pos = info.end
    if pos != data_size:
        raise _fail(path, f"data section is {data_size} bytes but tensors cover {pos}; "
                          "file truncated or has trailing bytes")


def data_layout(tensors: Iterable[tuple[str, str, tuple[int, ...]]]
                ) -> list[tuple[str, str, tuple[int, ...], int, int]]:
    """Where each tensor goes in the data section: ``(name, dtype, shape, begin, end)`` in file order.

    ``tensors`` holds ``(name, safetensors dtype such as "F16", shape)`` in any order. The order is
    safetensors' own (``dtypes.sort_key``: larger dtypes first, then by name), packed without gaps,
    which keeps every tensor aligned to its item size; the result is what ``encode_header`` takes.
    The writer and tools that build headers without data (benchmarks) share this one computation.

    Raises:
        ValueError: a name listed twice.
    """
    seen: set[str] = set()
    rows = []
    for name, dtype, shape in tensors:
        if name in seen:
            raise ValueError(f"tensor {name!r} is listed twice")
        seen.add(name)
        rows.append((name, dtype, tuple(int(d) for d in shape)))
    rows.sort(key=lambda r: sort_key(r[0], r[1]))
    out, pos = [], 0
    for name, dtype, shape in rows:
        n = ITEM_SIZES[dtype]
        for d in shape:
            n *= d
        out.append((name, dtype, shape, pos, pos + n))
        pos += n
    return out


def encode_header(tensors: list[tuple[str, str, tuple[int, ...], int, int]],
                  metadata: Mapping[str, str] | None) -> bytes:
    """Header bytes (length prefix + JSON + space padding to 8) for tensors in file order.

    ``tensors`` holds ``(name, dtype, shape, begin, end)``. The JSON is compact, metadata first,
    non-ASCII kept as UTF-8, exactly as ``safetensors`` serialises it, so a file we write with the
    same tensors (and at most one metadata entry, whose order safetensors randomises) is
    byte-identical to ``safetensors.torch.save``.
    """
    doc: dict[str, object] = {}
    if metadata is not None:
        doc[METADATA_KEY] = dict(metadata)
    for name, dtype, shape, begin, end in tensors:
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-(8 + len(body)) % 8)
    return struct.pack("<Q", len(body)) + body

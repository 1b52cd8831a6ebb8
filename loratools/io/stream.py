"""Sums of squares of many tensors (or row blocks) of safetensors files, read in one sequential pass.

A cold ``fro_ckpt`` resize needs the Frobenius norm of every base weight a LoRA touches: some
5 GB of an SDXL checkpoint. Mapping the file and converting each fp16 tensor to float32 first
costs a full copy per tensor and page faults in 4 KiB steps; here the byte ranges are sorted by
file offset and read by a reader thread with large ``readinto`` calls (the kernel's readahead
sees one forward scan), while the calling thread reduces the previous block: the disk and the
CPU work at the same time. Each block is reduced in float64 (``numpy.einsum`` converts fp16/bf16
/fp32 in small internal buffers: no float64 copy of the tensor), so the result is the exact sum
rounded once, not a float32 accumulation.

Only the bytes asked for are read (gaps between ranges are skipped with a seek); pages are
left in the page cache as any read leaves them, and nothing is mapped, so the process's
resident memory stays at a few blocks.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loratools.errors import InvalidFileError
from loratools.io.paths import os_problem

#: Bytes per read: large enough that per-call costs vanish, small enough that three stay cheap.
BLOCK = 16 << 20

_NUMPY = {"F16": np.float16, "F32": np.float32, "F64": np.float64}


@dataclass(frozen=True)
class ByteRange:
    """``[start, stop)`` absolute byte offsets of one float tensor (or row block) in ``path``."""

    path: Path
    start: int
    stop: int
    dtype: str  # safetensors dtype name: "F16", "BF16", "F32", "F64"


def tensor_range(sd: object, key: str, rows: tuple[int, int] | None = None) -> ByteRange | None:
    """Where ``key`` (rows ``rows`` of it) lies on disk, when ``sd`` is a ``loratools.io`` safetensors
    reader (or shards of them) and the dtype is one ``sum_of_squares`` reads; else None."""
    reader = getattr(sd, "_where", {}).get(key, sd)  # shards: the reader holding the key
    header = getattr(reader, "header", None)
    if header is None or key not in header.tensors:
        return None
    info = header.tensors[key]
    if info.dtype not in (*_NUMPY, "BF16"):
        return None
    start, stop = header.data_offset + info.begin, header.data_offset + info.end
    if rows is not None:
        row = (info.end - info.begin) // max(info.shape[0], 1)
        start, stop = start + rows[0] * row, start + rows[1] * row
    return ByteRange(header.path, start, stop, info.dtype)


def _squares(raw: memoryview, dtype: str) -> float:
    """float64 sum of squares of ``raw`` read as ``dtype``."""
    if dtype == "BF16":  # bfloat16 is the top half of a float32
        hi = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
        x = hi.view(np.float32)
    else:
        x = np.frombuffer(raw, dtype=_NUMPY[dtype])
    return float(np.einsum("i,i->", x, x, dtype=np.float64))


#: Read buffers in rotation; with at most ``_QUEUED`` pieces waiting and one being reduced, a
#: buffer is reused only after the reducer is done with it.
_BUFFERS = 4
_QUEUED = 2


def _reduce(raw: memoryview, dtype: str, helper: ThreadPoolExecutor) -> float:
    """``_squares`` of one piece, its halves on two threads (numpy releases the GIL): a warm page
    cache reads faster than one core reduces. Both halves are done before the piece's buffer is
    handed back to the reader."""
    if len(raw) < (4 << 20):
        return _squares(raw, dtype)
    half = (len(raw) // 2) // 8 * 8
    other = helper.submit(_squares, raw[half:], dtype)
    return _squares(raw[:half], dtype) + other.result()


def _blocks(ranges: Sequence[ByteRange], order: list[int]) -> Iterator[tuple[int, memoryview]]:
    """``(range index, bytes)`` pieces of the ranges in ``order``, each piece a whole number of
    elements, read by the calling thread (``sum_of_squares`` runs it on the reader thread) into
    ``_BUFFERS`` reused buffers."""
    fds: dict[Path, int] = {}
    largest = max((min(BLOCK, r.stop - r.start) for r in ranges), default=0)
    pool = [memoryview(bytearray(largest)) for _ in range(_BUFFERS)]
    turn = 0
    try:
        for i in order:
            r = ranges[i]
            fd = fds.get(r.path)
            if fd is None:
                try:
                    fd = fds[r.path] = os.open(r.path, os.O_RDONLY)
                except OSError as exc:
                    raise InvalidFileError(f"cannot read ({os_problem(exc, r.path)})", path=r.path) from None
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            pos = r.start
            while pos < r.stop:
                n = min(BLOCK, r.stop - pos)
                buf = pool[turn % _BUFFERS][:n]
                turn += 1
                got = os.preadv(fd, [buf], pos) if hasattr(os, "preadv") else _pread_into(fd, buf, pos)
                if got != n:
                    raise InvalidFileError(f"ends inside a tensor (read {got} of {n} bytes at offset {pos}); "
                                           "the file is truncated", path=r.path)
                yield i, buf
                pos += n
    finally:
        for fd in fds.values():
            os.close(fd)


def _pread_into(fd: int, buf: memoryview, pos: int) -> int:
    data = os.pread(fd, len(buf), pos)
    buf[:len(data)] = data
    return len(data)


def sum_of_squares(ranges: Sequence[ByteRange], progress: Callable[[int, int], None] | None = None) -> list[float]:
    """The float64 sum of squares of each range, read in file order with a reader thread.

    Args:
        ranges: byte ranges from ``tensor_range`` (any files, any order; overlaps allowed).
        progress: ``callback(bytes done, bytes total)``.

    Returns:
        One float per range, in the order given.

    Raises:
        InvalidFileError: a file cannot be read or ends early (the message names it).

    Example:
        >>> [fro2] = sum_of_squares([tensor_range(reader, "model.diffusion_model.out.2.weight")])
    """
    order = sorted(range(len(ranges)), key=lambda i: (str(ranges[i].path), ranges[i].start))
    total = sum(r.stop - r.start for r in ranges)
    out = [0.0] * len(ranges)
    pieces: queue.Queue = queue.Queue(maxsize=_QUEUED)
    failure: list[BaseException] = []
    stop = threading.Event()

    def put(item: tuple[int, memoryview] | None) -> bool:
        while not stop.is_set():
            try:
                pieces.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for item in _blocks(ranges, order):
                if not put(item):
                    return
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)
        finally:
            put(None)

    reader = threading.Thread(target=read, name="loratools-stream", daemon=True)
    reader.start()
    done = 0
    helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loratools-reduce")
    try:
        while (item := pieces.get()) is not None:
            i, raw = item
            out[i] += _reduce(raw, ranges[i].dtype, helper)
            done += len(raw)
            if progress:
                progress(done, total)
    finally:
        stop.set()
        reader.join()
        helper.shutdown()
    if failure:
        raise failure[0]
    return out

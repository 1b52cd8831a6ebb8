"""The hashes UIs show for model files, computed in one place.

* ``file_sha256``: sha256 of the whole file (Civitai/A1111 "SHA256"); ``autov2`` is its first 10 hex.
* ``legacy_file_hash``: A1111's old 8-hex model hash (sha256 of 64 KiB at offset 1 MiB); sd-scripts
  stores it for the base model as ``ss_sd_model_hash``.
* ``SshsHasher``: sd-scripts' ``sshs_model_hash`` / ``sshs_legacy_hash``. sd-scripts serialises the final
  tensors with only the ``ss_*`` metadata in memory and hashes (a) the data section and (b) 64 KiB at
  offset 1 MiB of that buffer. We never build the buffer: the data section is the one we stream to
  disk, and the ss-only header (needed only when the 1 MiB window starts inside it) is small.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from loratools.errors import InvalidFileError

LEGACY_OFFSET = 0x100000
LEGACY_LENGTH = 0x10000
_CHUNK = 1 << 22


def file_sha256(path: str | Path) -> str:
    """Lowercase hex sha256 of the whole file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    except OSError as exc:
        raise InvalidFileError(f"cannot read file to hash it ({exc.strerror})", path=path) from None
    return h.hexdigest()


def autov2(sha256_hex: str) -> str:
    """Civitai's AutoV2 short hash: the first 10 hex characters of the file's sha256."""
    return sha256_hex[:10]


def legacy_file_hash(path: str | Path) -> str:
    """A1111's old model hash: first 8 hex of sha256 of 64 KiB at offset 1 MiB of the file."""
    try:
        with open(path, "rb") as fh:
            fh.seek(LEGACY_OFFSET)
            return hashlib.sha256(fh.read(LEGACY_LENGTH)).hexdigest()[:8]
    except OSError as exc:
        raise InvalidFileError(f"cannot read file to hash it ({exc.strerror})", path=path) from None


def ss_only(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """The metadata sd-scripts keeps when hashing: keys starting with ``ss_``, in order."""
    return {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}


class SshsHasher:
    """Feed the data section in order; ``result()`` gives ``(sshs_model_hash, sshs_legacy_hash)``.

    Args:
        ss_header: the full header bytes (length prefix included) of the file as it would be written
            with only the ``ss_*`` metadata; only its length and, for huge headers, its bytes inside
            the legacy window matter.
    """

    def __init__(self, ss_header: bytes) -> None:
        self._model = hashlib.sha256()
        self._window = bytearray(ss_header[LEGACY_OFFSET:LEGACY_OFFSET + LEGACY_LENGTH])
        # The window's part inside the data section, as data-section offsets.
        self._lo = max(0, LEGACY_OFFSET - len(ss_header))
        self._hi = LEGACY_OFFSET + LEGACY_LENGTH - len(ss_header)
        self._pos = 0

    def update(self, chunk: bytes | memoryview) -> None:
        """Add the next bytes of the data section."""
        self._model.update(chunk)
        end = self._pos + len(chunk)
        lo, hi = max(self._lo, self._pos), min(self._hi, end)
        if lo < hi:
            self._window += memoryview(chunk)[lo - self._pos:hi - self._pos]
        self._pos = end

    def result(self) -> tuple[str, str]:
        return self._model.hexdigest(), hashlib.sha256(self._window).hexdigest()[:8]

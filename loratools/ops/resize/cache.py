"""On-disk cache of base-weight norms (Frobenius and exact spectral), shared by every run.

Computing a spectral norm means reading a base weight and diagonalising a Gram matrix (tenths
of a second for SDXL's large layers), so the first resize against a checkpoint pays once and
later runs read the cache. Unlike elias-gaeros' ``norms_cache.json`` (keyed by path, stored in
the script folder, written at exit), entries are keyed by the checkpoint's identity (file
names, sizes and modification times: a replaced checkpoint gets new entries) and by base key
plus row slice (TE2's fused q/k/v), live in the user cache folder (``platformdirs``), and the
file is replaced atomically, merged with what other processes wrote meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

_VERSION = 1


def default_cache_dir() -> Path:
    """``<user cache>/loratools/norms`` (``LORATOOLS_CACHE_DIR`` overrides the root)."""
    root = os.environ.get("LORATOOLS_CACHE_DIR")
    if root:
        return Path(root) / "norms"
    import platformdirs

    return Path(platformdirs.user_cache_dir("loratools", appauthor=False)) / "norms"


def checkpoint_identity(files: list[Path]) -> str:
    """A short id of a checkpoint's files: names, sizes and modification times (no full read)."""
    h = hashlib.sha256(f"v{_VERSION}".encode())
    for f in sorted(files):
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:32]


class NormCache:
    """``(base key, rows) -> {"fro": float[, "spn": float]}`` for one checkpoint (spn only once a recipe used it)."""

    def __init__(self, folder: Path | None, identity: str) -> None:
        self.path = None if folder is None else folder / f"{identity}.json"
        self._entries: dict[str, dict[str, float]] = self._read()
        self._dirty = False

    @staticmethod
    def key(component: str, base_key: str, rows: tuple[int, int] | None) -> str:
        return f"{component}/{base_key}" + (f"[{rows[0]}:{rows[1]}]" if rows else "")

    def _read(self) -> dict[str, dict[str, float]]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # a damaged cache is only a slower run
        return data.get("norms", {}) if isinstance(data, dict) else {}

    def get(self, key: str) -> dict[str, float] | None:
        return self._entries.get(key)

    def put(self, key: str, fro: float, spn: float | None = None) -> None:
        self._entries[key] = {"fro": fro} if spn is None else {"fro": fro, "spn": spn}
        self._dirty = True

    def save(self) -> None:
        """Merge with the file on disk and replace it atomically; failures only cost speed."""
        if self.path is None or not self._dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            merged = {**self._read(), **self._entries}
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".norms.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump({"version": _VERSION, "norms": merged}, fh)
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError:
            return
        self._dirty = False

"""The exact size of a safetensors file before it is written.

``size=`` promises a file no larger than the budget, header included, so the size of a
candidate selection is computed the way ``loratools.io`` will write it: the same header encoder
(compact JSON, metadata first, 8-byte padding) over the same tensor order, with the sshs hash
placeholders the writer fills in (fixed length). The writer's result is checked against this
prediction in the tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from loratools.io.dtypes import from_torch, item_size, sort_key
from loratools.io.header import encode_header
from loratools.io.writer import SSHS_KEYS, TensorSpec

_SSHS_PLACEHOLDER = {"sshs_model_hash": "0" * 64, "sshs_legacy_hash": "0" * 8}


def data_bytes(specs: Iterable[TensorSpec]) -> int:
    """Bytes of the non-scalar tensors the specs take: what ``allow_larger`` compares, so that
    what a resize adds for correctness (provenance metadata, float32 alphas where the input had
    fp16 ones or none) never counts as growth; only the factors do."""
    total = 0
    for s in specs:
        count = 1
        for d in s.shape:
            count *= int(d)
        if count > 1:
            total += count * item_size(from_torch(s.dtype))
    return total


def file_size(specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None, *, sshs_hashes: bool = True) -> int:
    """Bytes of the file ``write_safetensors(specs, metadata, sshs_hashes=...)`` writes."""
    rows = []
    for s in specs:
        dt = from_torch(s.dtype)
        n = item_size(dt)
        for d in s.shape:
            n *= int(d)
        rows.append((s.name, dt, tuple(int(d) for d in s.shape), n))
    rows.sort(key=lambda r: sort_key(r[0], r[1]))
    layout, pos = [], 0
    for name, dt, shape, n in rows:
        layout.append((name, dt, shape, pos, pos + n))
        pos += n
    meta = None if metadata is None else dict(metadata)
    if sshs_hashes:
        meta = {k: v for k, v in (meta or {}).items() if k not in SSHS_KEYS}
        meta.update(_SSHS_PLACEHOLDER)
    return len(encode_header(layout, meta)) + pos

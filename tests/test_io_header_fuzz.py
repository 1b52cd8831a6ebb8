"""Hypothesis fuzz of adapter files: every mutation is read or refused with a ``LoratoolsError``.

A small file holding one module of every adapter type is mutated the way broken downloads, buggy
converters and hostile users mutate files: a dimension changed or two swapped (same byte size), a
dimension added or dropped, a dtype renamed, a key renamed to another type's suffix, deleted or
duplicated, metadata replaced (PEFT alpha JSON included), header bytes flipped, inserted or cut,
offsets shifted, the data truncated or filled with raw bytes (NaN, Inf). The property: reading
the header, describing it, loading the adapter, computing every delta and running `check weights`
either works or raises ``LoratoolsError``; no other exception (the CLI would print a traceback).
When both succeed, the header-only summary and the parsed file agree on the modules.

``LORATOOLS_FUZZ_EXAMPLES`` scales both tests (the suite runs a few thousand header mutations;
the long run reported for issue 14 used 50x that).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loratools.adapters import describe_header, load_adapter
from loratools.errors import LoratoolsError
from loratools.io.dtypes import ITEM_SIZES
from loratools.io.header import data_layout, encode_header, parse_header

SCALE = float(os.environ.get("LORATOOLS_FUZZ_EXAMPLES", "1"))
HEADER_EXAMPLES = int(2000 * SCALE)
FILE_EXAMPLES = int(250 * SCALE)

#: One module of every type (kohya and LyCORIS naming, a PEFT pair with its metadata alpha).
BASE: list[tuple[str, str, tuple[int, ...]]] = [
    ("lora_unet_a.lora_down.weight", "F16", (2, 6)), ("lora_unet_a.lora_up.weight", "F16", (4, 2)),
    ("lora_unet_a.alpha", "F16", ()),
    ("lora_unet_c.lora_down.weight", "F32", (2, 3, 3, 3)), ("lora_unet_c.lora_up.weight", "F32", (4, 2, 1, 1)),
    ("lora_unet_c.alpha", "F32", ()), ("lora_unet_c.dora_scale", "F32", (4, 1, 1, 1)),
    ("lora_unet_t.lora_down.weight", "BF16", (2, 3, 1, 1)), ("lora_unet_t.lora_mid.weight", "BF16", (2, 2, 3, 3)),
    ("lora_unet_t.lora_up.weight", "BF16", (4, 2, 1, 1)), ("lora_unet_t.scale", "F32", ()),
    ("lycoris_h.hada_w1_a", "F32", (4, 2)), ("lycoris_h.hada_w1_b", "F32", (2, 6)),
    ("lycoris_h.hada_w2_a", "F32", (4, 2)), ("lycoris_h.hada_w2_b", "F32", (2, 6)), ("lycoris_h.alpha", "F32", ()),
    ("lycoris_k.lokr_w1", "F32", (2, 2)), ("lycoris_k.lokr_w2_a", "F32", (2, 1)),
    ("lycoris_k.lokr_w2_b", "F32", (1, 3)), ("lycoris_k.alpha", "F32", ()),
    ("lycoris_f.diff", "F16", (4, 6)), ("lycoris_f.diff_b", "F16", (4,)),
    ("lycoris_n.w_norm", "F32", (6,)), ("lycoris_n.b_norm", "F32", (6,)),
    ("lycoris_i.weight", "F32", (6,)), ("lycoris_i.on_input", "BOOL", ()),
    ("unet.p.lora_A.weight", "F32", (2, 6)), ("unet.p.lora_B.weight", "F32", (4, 2)),
]
BASE_META = {"ss_network_dim": "2", "lora_adapter_metadata": json.dumps({"unet.lora_alpha": 2.0})}
SUFFIXES = ["lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale", "scale", "hada_w1_a",
            "hada_w2_b", "hada_t1", "lokr_w1", "lokr_w1_b", "lokr_w2", "lokr_t2", "diff", "diff_b", "w_norm",
            "weight", "on_input", "lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "bias", "x"]
DTYPES = [*ITEM_SIZES, "F17", "", "f16"]
META_VALUES = ["", "2", "nan", "{", json.dumps({"unet.lora_alpha": "x"}), json.dumps({"unet.alpha_pattern": {"p": 0}}),
               json.dumps([1, 2]), json.dumps({"unet.lora_alpha": 1e308, "unet.use_rslora": True})]

dims = st.integers(0, 9)
edit = st.one_of(
    st.tuples(st.just("dim"), st.integers(0, 40), st.integers(0, 3), dims),
    st.tuples(st.just("swap"), st.integers(0, 40)),
    st.tuples(st.just("append"), st.integers(0, 40), dims),
    st.tuples(st.just("drop"), st.integers(0, 40)),
    st.tuples(st.just("dtype"), st.integers(0, 40), st.sampled_from(DTYPES)),
    st.tuples(st.just("rename"), st.integers(0, 40), st.sampled_from(SUFFIXES)),
    st.tuples(st.just("delete"), st.integers(0, 40)),
    st.tuples(st.just("dup"), st.integers(0, 40), st.sampled_from(["lora_unet_a", "lycoris_a", "unet.a"])),
    st.tuples(st.just("meta"), st.sampled_from(["lora_adapter_metadata", "ss_network_alpha", "ss_base_model_version"]),
              st.sampled_from(META_VALUES)),
)


def _edited(edits) -> tuple[list[tuple[str, str, tuple[int, ...]]], dict[str, str]]:
    rows, meta = [list(r) for r in BASE], dict(BASE_META)
    for e in edits:
        if e[0] == "meta":
            meta[e[1]] = e[2]
            continue
        if not rows:
            break
        row = rows[e[1] % len(rows)]
        name, dtype, shape = row
        if e[0] == "dim" and shape:
            shape = tuple(e[3] if i == e[2] % len(shape) else d for i, d in enumerate(shape))
        elif e[0] == "swap":
            shape = tuple(reversed(shape))
        elif e[0] == "append":
            shape = (*shape, e[2])
        elif e[0] == "drop":
            shape = shape[:-1]
        elif e[0] == "dtype":
            dtype = e[2]
        elif e[0] == "rename":
            name = name.rsplit(".", 2 if name.endswith(".weight") else 1)[0] + "." + e[2]
        elif e[0] == "delete":
            rows.remove(row)
            continue
        elif e[0] == "dup":
            rows.append([e[2] + "." + name.split(".")[-1], dtype, shape])
        row[:] = [name, dtype, shape]
    unique = {r[0]: (r[0], r[1], tuple(r[2])) for r in rows}  # a renamed duplicate replaces (JSON keeps one)
    return list(unique.values()), meta


def _file_bytes(rows, meta, raw_edits, fill: bytes | None) -> bytes:
    """Header (consistent offsets when every dtype is known) + data, then raw byte edits."""
    known = [r for r in rows if r[1] in ITEM_SIZES]
    if len(known) == len(rows):
        layout = data_layout(rows)
        header = encode_header(layout, meta)
        size = layout[-1][4] if layout else 0
    else:  # an unknown dtype: offsets cannot be computed, the header must still be refused cleanly
        doc = {"__metadata__": meta, **{n: {"dtype": d, "shape": list(s), "data_offsets": [0, 0]} for n, d, s in rows}}
        body = json.dumps(doc).encode()
        header, size = struct.pack("<Q", len(body)) + body, 0
    data = bytearray(_finite_data(known) if fill is None and len(known) == len(rows) else (fill or b"") * size)[:size]
    data += b"\0" * (size - len(data))
    blob = bytearray(header + bytes(data))
    for kind, pos, value in raw_edits:
        if not blob:
            break
        pos %= len(blob)
        if kind == "flip":
            blob[pos] = value
        elif kind == "insert":
            blob[pos:pos] = bytes([value])
        elif kind == "cut":
            del blob[pos:]
    return bytes(blob)


def _finite_data(rows) -> bytes:
    """Each tensor's bytes in file order: small finite values of its own dtype."""
    from loratools.io.dtypes import to_torch

    out = bytearray()
    for name, dtype, shape, _, _ in data_layout(rows):
        t = (torch.arange(math.prod(shape)).remainder(7).sub(3).float() / 4).reshape(shape)
        out += t.to(to_torch(dtype)).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return bytes(out)


raw_edit = st.tuples(st.sampled_from(["flip", "insert", "cut"]), st.integers(0, 1 << 16), st.integers(0, 255))
mutation = st.tuples(st.lists(edit, max_size=4), st.lists(raw_edit, max_size=2),
                     st.one_of(st.none(), st.binary(min_size=1, max_size=8)))


def _read_header_bytes(blob: bytes):
    """``read_header``'s checks on bytes: length prefix, then ``parse_header``."""
    if len(blob) < 8:
        raise LoratoolsError("too short")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        raise LoratoolsError("length past the end")
    return parse_header(blob[8:8 + n], len(blob), "fuzz.safetensors")


#: The suite's run is the same every time; a scaled (long) run explores new inputs each time.
_SETTINGS = dict(deadline=None, derandomize="LORATOOLS_FUZZ_EXAMPLES" not in os.environ, database=None,
                 suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=HEADER_EXAMPLES, **_SETTINGS)
@given(mutation)
def test_header_mutations_are_read_or_refused(m):
    """Header path only (check keys, metadata show): no torch, no file."""
    edits, raw, fill = m
    rows, meta = _edited(edits)
    try:
        header = _read_header_bytes(_file_bytes(rows, meta, raw, b"\0"))
        describe_header(header.tensors, header.metadata, path="fuzz.safetensors")
    except LoratoolsError:
        pass


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    """One folder per module (hypothesis reruns a test body many times; pytest removes it)."""
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=FILE_EXAMPLES, **_SETTINGS)
@given(mutation)
def test_file_mutations_are_loaded_or_refused(fuzz_dir, m):
    """The tensor path (check weights, merge, resize, convert): load, every delta, `check weights`."""
    from loratools.ops.check_weights import check_file

    edits, raw, fill = m
    rows, meta = _edited(edits)
    path = fuzz_dir / "fuzz.safetensors"
    path.write_bytes(_file_bytes(rows, meta, raw, fill))
    summary = None
    try:
        from loratools.io import read_header

        header = read_header(path)
        summary = describe_header(header.tensors, header.metadata, path=path)
    except LoratoolsError:
        pass
    try:
        adapter = load_adapter(path)
    except LoratoolsError:
        return
    if summary is not None:
        assert set(summary.modules) == set(adapter.modules)
    for module in adapter.modules.values():
        try:
            base = torch.ones(module.weight_shape) if module.kind != "ia3" else None
            if base is not None or not module.needs_base:
                assert module.delta(base).shape == tuple(module.weight_shape)
                module.bias_delta()
        except LoratoolsError:
            pass
    try:
        check_file(path)
    except LoratoolsError:
        pass

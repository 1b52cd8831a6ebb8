"""Header validation: every malformed input gives one clean InvalidFileError naming the problem."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loratools.errors import InvalidFileError
from loratools.io.header import encode_header, parse_header, read_header


def _file(tmp_path: Path, header: dict | bytes, data: bytes = b"", name: str = "f.safetensors") -> Path:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    p = tmp_path / name
    p.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return p


def _entry(dtype="F32", shape=(2,), begin=0, end=8):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


def test_valid_header_reads_without_data(tmp_path):
    p = _file(tmp_path, {"__metadata__": {"ss_network_dim": "8"}, "a": _entry(), "b": _entry("F16", (2, 2), 8, 16)},
              bytes(16))
    h = read_header(p)
    assert h.metadata == {"ss_network_dim": "8"}
    assert h.tensors["b"].shape == (2, 2) and h.tensors["b"].dtype == "F16"
    assert h.tensors["b"].begin == 8 and h.data_offset == 8 + (p.stat().st_size - 8 - 16)
    assert h.file_size == p.stat().st_size


BAD = [
    ("empty", b"", "too short"),
    ("short", b"\x01\x02\x03", "too short"),
    ("length past end", struct.pack("<Q", 1000) + b"{}", "past the end"),
    ("huge length", struct.pack("<Q", 2**63), "limit"),
    ("not json", struct.pack("<Q", 5) + b"{abc}", "not valid JSON"),
    ("not object", struct.pack("<Q", 2) + b"[]", "does not start"),
    ("not utf8", struct.pack("<Q", 4) + b'{"\xff}', "UTF-8"),
]


@pytest.mark.parametrize("label,content,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_bytes(tmp_path, label, content, needle):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(content)
    with pytest.raises(InvalidFileError) as exc:
        read_header(p)
    msg = str(exc.value)
    assert needle in msg and str(p) in msg and "\n" not in msg


HEADERS = [
    ("unknown dtype", {"a": _entry("F13")}, bytes(8), "unknown dtype"),
    ("size mismatch", {"a": _entry("F32", (3,))}, bytes(8), "needs 12 bytes"),
    ("overlap", {"a": _entry(), "b": _entry("F32", (2,), 4, 12)}, bytes(12), "overlap"),
    ("out of range", {"a": _entry("F32", (2,), 0, 8)}, bytes(4), "past the end"),
    ("gap", {"a": _entry("F32", (1,), 4, 8)}, bytes(8), "gap"),
    ("trailing bytes", {"a": _entry()}, bytes(12), "trailing"),
    ("bad shape", {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", "shape"),
    ("bool shape", {"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, bytes(4), "shape"),
    ("bad offsets", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, bytes(4), "data_offsets"),
    ("entry not object", {"a": 3}, b"", "not an object"),
    ("metadata not strings", {"__metadata__": {"k": 1}}, b"", "strings"),
]


@pytest.mark.parametrize("label,header,data,needle", HEADERS, ids=[h[0] for h in HEADERS])
def test_bad_headers(tmp_path, label, header, data, needle):
    p = _file(tmp_path, header, data)
    with pytest.raises(InvalidFileError, match=needle):
        read_header(p)


def test_duplicate_keys(tmp_path):
    body = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    with pytest.raises(InvalidFileError, match="duplicate"):
        read_header(_file(tmp_path, body, b"\x00"))


def test_missing_and_directory(tmp_path):
    with pytest.raises(InvalidFileError, match="not found"):
        read_header(tmp_path / "nope.safetensors")
    with pytest.raises(InvalidFileError, match="directory"):
        read_header(tmp_path)


def test_pickle_checkpoint_named(tmp_path):
    import torch

    p = tmp_path / "model.safetensors"
    torch.save({"w": torch.ones(1)}, p)  # a renamed .pt file
    with pytest.raises(InvalidFileError, match="PyTorch checkpoint"):
        read_header(p)


def test_deep_nesting(tmp_path):
    body = b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}"
    with pytest.raises(InvalidFileError):
        read_header(_file(tmp_path, body))


# ---- property-based fuzzing: any bytes -> a header or InvalidFileError, never another exception ----

_VALID = encode_header([("w", "F16", (2, 3), 0, 12), ("b", "I8", (4,), 12, 16)], {"ss_x": "1", "k": "é"})
_VALID_FILE = _VALID + bytes(16)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    """One folder per module (hypothesis reruns a test body many times; pytest removes it)."""
    return tmp_path_factory.mktemp("fuzz")


def _parse_bytes(folder: Path, blob: bytes) -> None:
    """Write ``blob`` as a file and read it: a header or one-line InvalidFileError, nothing else."""
    p = folder / "fuzz.safetensors"
    p.write_bytes(blob)
    try:
        h = read_header(p)
    except InvalidFileError as exc:
        assert "\n" not in str(exc) and str(p) in str(exc)
        return
    assert h.data_offset + sum(t.nbytes for t in h.tensors.values()) == len(blob)


_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(fuzz_dir, blob):
    _parse_bytes(fuzz_dir, blob)


@_FUZZ
@given(st.integers(min_value=0, max_value=len(_VALID_FILE)))
def test_fuzz_truncations(fuzz_dir, cut):
    _parse_bytes(fuzz_dir, _VALID_FILE[:cut])


@_FUZZ
@given(st.lists(st.tuples(st.integers(0, len(_VALID_FILE) - 1), st.integers(0, 255)), min_size=1, max_size=6))
def test_fuzz_mutations(fuzz_dir, edits):
    blob = bytearray(_VALID_FILE)
    for pos, value in edits:
        blob[pos] = value
    _parse_bytes(fuzz_dir, bytes(blob))


_json_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 50) | st.text(max_size=5),
                            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                            max_leaves=10)


@_FUZZ
@given(st.dictionaries(st.sampled_from(["w", "b", "__metadata__", "x"]),
                       st.fixed_dictionaries({"dtype": st.sampled_from(["F16", "I8", "F99", 3]),
                                              "shape": _json_values, "data_offsets": _json_values})
                       | _json_values, max_size=3),
       st.integers(0, 64))
def test_fuzz_structured_headers(doc, data_len):
    body = json.dumps(doc).encode()
    try:
        h = parse_header(body, 8 + len(body) + data_len)
    except InvalidFileError:
        return
    assert sum(t.nbytes for t in h.tensors.values()) == data_len


def test_fuzz_on_disk_roundtrip(tmp_path):
    p = tmp_path / "ok.safetensors"
    p.write_bytes(_VALID_FILE)
    h = read_header(p)
    assert h.metadata == {"ss_x": "1", "k": "é"} and list(h.tensors) == ["w", "b"]

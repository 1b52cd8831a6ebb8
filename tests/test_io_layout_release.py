"""io helpers shared by other layers: page release of a reader, opt-in sha256, the data layout,
and the one table of precision names."""

from __future__ import annotations

import hashlib
import mmap

import pytest
import safetensors.torch
import torch

from loratools.errors import UsageError
from loratools.io import TensorSpec, open_safetensors, read_header, save_tensors, write_safetensors
from loratools.io.dtypes import parse_dtype_name
from loratools.io.header import data_layout, encode_header


@pytest.fixture()
def big_file(tmp_path):
    """Tensors spanning several pages, one sharing a page with its neighbours, one empty."""
    g = torch.Generator().manual_seed(3)
    tensors = {"a": torch.randn(3, 4096, generator=g), "b": torch.randn(7, generator=g).half(),
               "c": torch.randn(5000, generator=g).to(torch.bfloat16), "empty": torch.zeros(0, 4)}
    path = tmp_path / "t.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    return path, tensors


def test_release_keeps_later_reads_correct(big_file):
    path, tensors = big_file
    r = open_safetensors(path)
    r.release("a")  # nothing mapped yet: a no-op
    assert r._mm is None
    first = {k: r[k].clone() for k in tensors}
    for k in tensors:
        r.release(k)
        for j, t in tensors.items():  # every tensor, including neighbours on a shared page
            assert torch.equal(r[j], t), (k, j)
    assert all(torch.equal(first[k], tensors[k]) for k in tensors)
    with pytest.raises(KeyError):
        r.release("missing")


@pytest.mark.skipif(not hasattr(mmap.mmap, "madvise") or not hasattr(mmap, "MADV_DONTNEED"),
                    reason="no madvise(MADV_DONTNEED) on this platform: release is a no-op")
def test_release_discards_the_pages_copy_on_write_changes(big_file):
    # Evidence that the pages really were dropped (the documented cost of releasing): an in-place
    # write into a mapped tensor (copy-on-write, never the file) is gone after release.
    path, tensors = big_file
    r = open_safetensors(path)
    view = r["a"]
    view[1, 2000] = 12345.0
    assert r["a"][1, 2000] == 12345.0
    assert torch.equal(open_safetensors(path)["a"], tensors["a"])  # the file itself is untouched
    r.release("a")
    assert torch.equal(r["a"], tensors["a"])


def test_sha256_opt_in_gives_the_same_answer(tmp_path):
    t = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(3, dtype=torch.float16)}
    lazy = save_tensors(tmp_path / "lazy.safetensors", t, {"k": "v"})
    assert lazy._sha256 is None  # not hashed while writing
    streamed = save_tensors(tmp_path / "streamed.safetensors", t, {"k": "v"}, sha256=True)
    assert streamed._sha256 is not None  # hashed while writing, no read-back
    expected = hashlib.sha256((tmp_path / "lazy.safetensors").read_bytes()).hexdigest()
    assert lazy.sha256 == streamed.sha256 == expected and lazy.autov2 == expected[:10]
    with_sshs = save_tensors(tmp_path / "sshs.safetensors", t, {"k": "v"}, sshs_hashes=True, sha256=True)
    assert with_sshs.sha256 == hashlib.sha256((tmp_path / "sshs.safetensors").read_bytes()).hexdigest()


def test_data_layout_matches_the_reference_writer(tmp_path):
    tensors = {"z": torch.zeros(2, 3, dtype=torch.float16), "a": torch.zeros(5, dtype=torch.int8),
               "m": torch.zeros(4, dtype=torch.float32), "b": torch.zeros(1, 2, dtype=torch.float32)}
    ref = tmp_path / "ref.safetensors"
    safetensors.torch.save_file(tensors, str(ref))
    from loratools.io.dtypes import from_torch

    layout = data_layout((k, from_torch(v.dtype), tuple(v.shape)) for k, v in tensors.items())
    header = read_header(ref)
    assert [row[0] for row in layout] == list(header.tensors)  # safetensors' own order
    assert [(r[3], r[4]) for r in layout] == [(i.begin, i.end) for i in header.tensors.values()]
    assert ref.read_bytes()[:len(encode_header(layout, None))] == encode_header(layout, None)
    with pytest.raises(ValueError, match="listed twice"):
        data_layout([("x", "F16", (1,)), ("x", "F32", (1,))])
    with pytest.raises(ValueError, match="listed twice"):  # the writer uses the same computation
        write_safetensors(tmp_path / "dup.safetensors", [TensorSpec("x", torch.float16, (1,))] * 2,
                          lambda n: torch.zeros(1, dtype=torch.float16))


@pytest.mark.parametrize(("name", "dtype"), [("fp16", torch.float16), (" Half ", torch.float16),
                                             ("BF16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                             ("fp32", torch.float32), ("float", torch.float32),
                                             ("float32", torch.float32), (None, None)])
def test_parse_dtype_name(name, dtype):
    assert parse_dtype_name(name) is dtype


def test_parse_dtype_name_refuses_unknown_names_naming_the_option():
    with pytest.raises(UsageError, match="--save_precision 'fp8' is not a known precision; use fp16, bf16 or fp32"):
        parse_dtype_name("fp8", option="--save_precision")


def test_dtypes_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, loratools.io.dtypes, loratools.io.header; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_release_pages_on_shards_and_plain_dicts(tmp_path):
    """io.release_pages works on every component Mapping io hands out, and is a no-op on a dict."""
    import torch

    from loratools.io import release_pages, save_tensors
    from loratools.io.checkpoint import _Shards
    from loratools.io.reader import open_safetensors

    save_tensors(tmp_path / "a.safetensors", {"x": torch.arange(4096.0)})
    save_tensors(tmp_path / "b.safetensors", {"y": torch.ones(8)})
    shards = _Shards([open_safetensors(tmp_path / "a.safetensors"), open_safetensors(tmp_path / "b.safetensors")])
    before = shards["x"].clone()
    release_pages(shards, "x")
    release_pages(shards, "y")  # never read: nothing mapped yet
    torch.testing.assert_close(shards["x"], before)
    release_pages({"x": before}, "x")

"""Writer and reader: byte-identical to safetensors, every dtype, atomic, never overwrites inputs."""

from __future__ import annotations

import hashlib
import os
import struct

import pytest
import safetensors.torch
import torch

from loratools.errors import OutputExistsError, UsageError
from loratools.io import TensorSpec, open_safetensors, read_header, save_tensors, write_safetensors

ALL_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn,
              torch.float8_e5m2, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
              torch.bool, torch.uint16, torch.uint32, torch.uint64]


def _sample(dtype: torch.dtype, shape=(3, 5)) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash(str(dtype)) % 1000)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 3).to(dtype)
    return torch.randint(0, 100, shape, generator=g).to(dtype)


@pytest.fixture()
def tensors():
    t = {f"t_{str(d).removeprefix('torch.')}": _sample(d) for d in ALL_DTYPES}
    t["scalar"] = torch.tensor(4.0, dtype=torch.float16)
    t["empty"] = torch.zeros(0, 3)
    t["a.lora_up.weight"] = torch.randn(8, 2)
    return t


def test_byte_identical_to_safetensors(tmp_path, tensors):
    for i, meta in enumerate((None, {}, {"ss_network_dim": "8"}, {"k": 'é "q"\n\x01'})):
        out = tmp_path / f"o{i}.safetensors"
        save_tensors(out, tensors, meta)
        assert out.read_bytes() == safetensors.torch.save(tensors, meta)


def test_roundtrip_every_dtype(tmp_path, tensors):
    out = tmp_path / "all.safetensors"
    written = save_tensors(out, tensors, {"a": "1", "b": "2"})
    r = open_safetensors(out)
    assert set(r) == set(tensors) and r.metadata == {"a": "1", "b": "2"}
    for k, v in tensors.items():
        got = r[k]
        assert got.dtype == v.dtype and got.shape == v.shape
        assert torch.equal(got.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))
    ref = safetensors.torch.load_file(out)
    assert all(torch.equal(ref[k].reshape(-1).view(torch.uint8), r[k].reshape(-1).view(torch.uint8)) for k in r)
    assert written.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert written.autov2 == written.sha256[:10]
    assert written.size == out.stat().st_size


def test_reader_is_lazy_and_copy_on_write(tmp_path):
    out = tmp_path / "w.safetensors"
    save_tensors(out, {"w": torch.ones(4, 4)})
    r = open_safetensors(out)
    assert r._mm is None and r.info("w").shape == (4, 4)
    t = r["w"]
    t.zero_()
    assert torch.equal(open_safetensors(out)["w"], torch.ones(4, 4))


def test_streams_one_tensor_at_a_time(tmp_path):
    calls = []

    def produce(name):
        calls.append(name)
        return torch.full((2, 2), float(len(calls)), dtype=torch.float16 if name.startswith("h") else torch.float32)

    specs = [TensorSpec("h1", torch.float16, (2, 2)), TensorSpec("b", torch.float32, (2, 2)),
             TensorSpec("a", torch.float32, (2, 2))]
    write_safetensors(tmp_path / "s.safetensors", specs, produce)
    assert calls == ["a", "b", "h1"]  # safetensors order: larger dtype first, then name


def test_refuses_existing_and_inputs(tmp_path):
    out = tmp_path / "o.safetensors"
    save_tensors(out, {"w": torch.zeros(1)})
    with pytest.raises(OutputExistsError, match="--overwrite"):
        save_tensors(out, {"w": torch.ones(1)})
    save_tensors(out, {"w": torch.ones(1)}, overwrite=True)
    assert open_safetensors(out)["w"].item() == 1
    link = tmp_path / "link.safetensors"
    os.symlink(out, link)
    with pytest.raises(OutputExistsError, match="input"):
        save_tensors(link, {"w": torch.ones(1)}, overwrite=True, protected=[out])
    with pytest.raises(OutputExistsError, match="directory"):
        save_tensors(tmp_path, {"w": torch.ones(1)}, overwrite=True)


def test_bad_folders(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        save_tensors(tmp_path / "nope" / "o.safetensors", {"w": torch.ones(1)})
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(UsageError, match="permission denied"):
            save_tensors(ro / "o.safetensors", {"w": torch.ones(1)})
    finally:
        ro.chmod(0o700)


def test_failure_leaves_nothing(tmp_path):
    out = tmp_path / "o.safetensors"
    save_tensors(out, {"w": torch.zeros(2)})
    before = out.read_bytes()

    def produce(name):
        if name == "b":
            raise RuntimeError("boom")
        return torch.ones(2)

    with pytest.raises(RuntimeError, match="boom"):
        write_safetensors(out, [TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.float32, (2,))],
                          produce, overwrite=True)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.safetensors"]
    with pytest.raises(ValueError, match="declared"):
        write_safetensors(tmp_path / "x.safetensors", [TensorSpec("a", torch.float32, (2,))],
                          lambda n: torch.ones(3))
    assert not (tmp_path / "x.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.safetensors"]


def test_file_mode_follows_umask(tmp_path):
    out = tmp_path / "m.safetensors"
    save_tensors(out, {"w": torch.zeros(1)})
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_unaligned_file_reads(tmp_path):
    # hand-made file whose F32 tensor starts at an odd offset (safetensors itself never writes this)
    body = b'{"u":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"f":{"dtype":"F32","shape":[1],"data_offsets":[1,5]}}'
    p = tmp_path / "u.safetensors"
    p.write_bytes(struct.pack("<Q", len(body)) + body + b"\x07" + struct.pack("<f", 2.5))
    r = open_safetensors(p)
    assert r["f"].item() == 2.5 and r["u"].item() == 7
    assert read_header(p).tensors["f"].begin == 1

"""metadata set/delete/strip: tensors byte-identical, hashes recomputed, every refusal."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import safetensors.torch
import torch

from loratools.errors import OutputExistsError, UsageError
from loratools.io import open_safetensors, save_tensors
from loratools.ops.metadata import TRAINING_DATA_KEYS, edit_metadata, parse_assignments


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"lora_unet_a.lora_down.weight": torch.randn(4, 64, generator=g).half(),
            "lora_unet_a.lora_up.weight": torch.randn(64, 4, generator=g).half(),
            "lora_unet_a.alpha": torch.tensor(2.0).half(),
            "lora_unet_a.dora_scale": torch.randn(64, 1, generator=g)}


META = {"ss_network_dim": "4", "ss_tag_frequency": json.dumps({"5_hero": {"hero": 5}}),
        "ss_dataset_dirs": json.dumps({"5_hero": {"n_repeats": 5, "img_count": 1}}),
        "ss_sd_model_name": "/home/alice/models/base.safetensors", "ss_training_comment": "private",
        "modelspec.title": "Hero"}


@pytest.fixture()
def lora(tmp_path):
    p = tmp_path / "in.safetensors"
    save_tensors(p, _tensors(), META, sshs_hashes=True)
    return p


def _expected_hashes(metadata):
    buf = safetensors.torch.save(_tensors(), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    (n,) = struct.unpack("<Q", buf[:8])
    return hashlib.sha256(buf[8 + n:]).hexdigest(), hashlib.sha256(buf[0x100000:0x110000]).hexdigest()[:8]


def _same_tensors(a, b):
    ra, rb = open_safetensors(a), open_safetensors(b)
    return list(ra) == list(rb) and all(ra.info(k).dtype == rb.info(k).dtype and
                                        torch.equal(ra[k].reshape(-1).view(torch.uint8), rb[k].reshape(-1).view(torch.uint8))
                                        for k in ra)


def test_set_and_delete(lora, tmp_path):
    out = tmp_path / "out.safetensors"
    r = edit_metadata(lora, output=out, set_values={"modelspec.author": "me", "ss_network_dim": "8"},
                      delete=["ss_training_comment"])
    meta = open_safetensors(out).metadata
    assert meta["modelspec.author"] == "me" and meta["ss_network_dim"] == "8" and "ss_training_comment" not in meta
    assert [(c.key, c.action) for c in r.changes] == [("ss_training_comment", "deleted"),
                                                      ("modelspec.author", "set"), ("ss_network_dim", "set")]
    assert _same_tensors(lora, out) and r.hashes_recomputed
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == _expected_hashes(meta)
    assert open_safetensors(lora).metadata["ss_network_dim"] == "4"  # input untouched


def test_strip_training_data(lora, tmp_path):
    out = tmp_path / "share.safetensors"
    r = edit_metadata(lora, output=out, strip_training_data=True)
    meta = open_safetensors(out).metadata
    for key in ("ss_tag_frequency", "ss_dataset_dirs", "ss_training_comment"):
        assert key not in meta
    assert meta["ss_sd_model_name"] == "base.safetensors" and meta["modelspec.title"] == "Hero"
    reasons = {c.key: (c.action, c.reason) for c in r.changes}
    assert reasons["ss_tag_frequency"] == ("deleted", TRAINING_DATA_KEYS["ss_tag_frequency"])
    assert reasons["ss_sd_model_name"][0] == "shortened"
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == _expected_hashes(meta)


def test_in_place_is_atomic_replacement(lora):
    inode = lora.stat().st_ino
    reader = open_safetensors(lora)
    before = reader["lora_unet_a.lora_up.weight"].clone()
    edit_metadata(lora, in_place=True, set_values={"k": "v"})
    assert lora.stat().st_ino != inode  # a new file renamed over the old one
    assert open_safetensors(lora).metadata["k"] == "v"
    assert torch.equal(reader["lora_unet_a.lora_up.weight"], before)  # old mapping still valid
    assert [p.name for p in lora.parent.iterdir()] == ["in.safetensors"]


def test_no_hashes_added_when_absent(tmp_path):
    p = tmp_path / "plain.safetensors"
    save_tensors(p, _tensors(), {"a": "1"})
    r = edit_metadata(p, output=tmp_path / "o.safetensors", set_values={"b": "2"})
    assert not r.hashes_recomputed and open_safetensors(tmp_path / "o.safetensors").metadata == {"a": "1", "b": "2"}


def test_refusals(lora, tmp_path):
    with pytest.raises(UsageError, match="-o OUT or --in-place"):
        edit_metadata(lora, set_values={"a": "b"})
    with pytest.raises(UsageError, match="-o OUT or --in-place"):
        edit_metadata(lora, output=tmp_path / "x.safetensors", in_place=True)
    with pytest.raises(OutputExistsError, match="input"):
        edit_metadata(lora, output=lora, set_values={"a": "b"}, overwrite=True)
    (tmp_path / "exists.safetensors").write_bytes(b"x")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        edit_metadata(lora, output=tmp_path / "exists.safetensors", set_values={"a": "b"})
    with pytest.raises(UsageError, match="not in the metadata"):
        edit_metadata(lora, in_place=True, delete=["ss_nope"])
    with pytest.raises(UsageError, match="computed"):
        edit_metadata(lora, in_place=True, set_values={"sshs_model_hash": "abc"})
    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_assignments(["novalue"])
    value_file = tmp_path / "desc.txt"
    value_file.write_text("long\ntext", encoding="utf-8")
    assert parse_assignments(["a=b=c", f"d=@{value_file}"]) == {"a": "b=c", "d": "long\ntext"}
    binary = tmp_path / "thumb.png"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xf0\x9f")
    with pytest.raises(UsageError, match="thumb.png is not UTF-8 text"):  # was a UnicodeDecodeError traceback
        parse_assignments([f"modelspec.thumbnail=@{binary}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["desc.txt", "exists.safetensors", "in.safetensors",
                                                          "thumb.png"]

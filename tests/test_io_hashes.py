"""sshs_model_hash / sshs_legacy_hash / sha256 / AutoV2 against independent computations."""

from __future__ import annotations

import hashlib
import struct

import pytest
import safetensors.torch
import torch

from loratools.io import open_safetensors, save_tensors
from loratools.io.hashes import autov2, file_sha256, legacy_file_hash


def _sd_scripts_hashes(tensors, metadata):
    """sd-scripts' precalculate_safetensors_hashes, written out: serialise with ss_* only, hash."""
    buf = safetensors.torch.save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    (n,) = struct.unpack("<Q", buf[:8])
    return hashlib.sha256(buf[8 + n:]).hexdigest(), hashlib.sha256(buf[0x100000:0x110000]).hexdigest()[:8]


def _lora(n_bytes_target: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t, total, i = {}, 0, 0
    while total < n_bytes_target:
        t[f"lora_unet_m{i}.lora_down.weight"] = torch.randn(16, 320, generator=g).half()
        t[f"lora_unet_m{i}.lora_up.weight"] = torch.randn(320, 16, generator=g).half()
        t[f"lora_unet_m{i}.alpha"] = torch.tensor(8.0).half()
        total += 2 * 16 * 320 * 2
        i += 1
    t["lora_unet_m0.dora_scale"] = torch.randn(320, 1)  # a second dtype, so order matters
    return t


@pytest.mark.parametrize("size,ss_meta", [
    (3 << 20, {"ss_network_dim": "16"}),              # window in the data section
    (400 << 10, {"ss_network_dim": "16"}),            # file shorter than the window's end
    (2 << 20, {"ss_tag_frequency": "x" * 1_100_000}),  # window starts inside the ss-only header
    (2 << 20, {"ss_tag_frequency": "y" * 1_040_000}),  # window straddles header and data
])
def test_sshs_matches_sd_scripts(tmp_path, size, ss_meta):
    tensors = _lora(size)
    meta = {**ss_meta, "modelspec.title": "t", "ssmd_display_name": "not hashed",
            "sshs_model_hash": "stale", "sshs_legacy_hash": "stale"}
    out = tmp_path / "l.safetensors"
    w = save_tensors(out, tensors, meta, sshs_hashes=True)
    model, legacy = _sd_scripts_hashes(tensors, meta)
    assert (w.sshs_model_hash, w.sshs_legacy_hash) == (model, legacy)
    on_disk = open_safetensors(out).metadata
    assert on_disk["sshs_model_hash"] == model and on_disk["sshs_legacy_hash"] == legacy
    assert on_disk["ssmd_display_name"] == "not hashed"
    # A1111's "addnet hash" of the final file is the same data-section hash
    raw = out.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert hashlib.sha256(raw[8 + n:]).hexdigest() == model
    assert w.sha256 == hashlib.sha256(raw).hexdigest() == file_sha256(out)
    assert w.autov2 == autov2(w.sha256) == w.sha256[:10]
    assert legacy_file_hash(out) == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]


def test_sshs_without_ss_metadata(tmp_path):
    tensors = _lora(1 << 20)
    w = save_tensors(tmp_path / "n.safetensors", tensors, None, sshs_hashes=True)
    assert (w.sshs_model_hash, w.sshs_legacy_hash) == _sd_scripts_hashes(tensors, {})
    assert set(w.metadata) == {"sshs_model_hash", "sshs_legacy_hash"}

"""The merge engine in-process: several adapters on one weight, dtypes, .ckpt bases, metadata, --verify.

Expected deltas come from ``loratools.tiny.make_lora``'s ground truth (float32 deltas computed from
the factors it drew), not from the adapter parser the merge itself uses.
"""

from __future__ import annotations

import json

import pytest
import torch

from loratools.io import open_safetensors, read_header, save_tensors
from loratools.keys.index import BaseIndex
from loratools.ops.merge import MergeOptions, WeightedPath, merge_checkpoint
from loratools.tiny import make_lora, save_single_file


@pytest.fixture(scope="module")
def setup(tiny_sd1, tmp_path_factory):
    folder = tmp_path_factory.mktemp("merge_options")
    base = save_single_file(tiny_sd1, folder / "sd1.safetensors")
    a = make_lora(tiny_sd1, "sd1", "lora", rank=4, alpha=2.0, seed=7, dtype=torch.float32, path=folder / "a.safetensors")
    b = make_lora(tiny_sd1, "sd1", "locon", rank=2, alpha=2.0, seed=8, dtype=torch.float32, path=folder / "b.safetensors")
    return folder, base, a, b


def test_two_adapters_on_one_weight_add_up(setup, tmp_path):
    _, base, a, b = setup
    out = tmp_path / "ab.safetensors"
    result = merge_checkpoint(MergeOptions(base, [WeightedPath(a.path, 0.6), WeightedPath(b.path, -0.3)], out,
                                           verify=True))
    assert result.verified and [r.applied for r in result.adapters] == [len(a.targets), len(b.targets)]
    index = BaseIndex.from_key_shapes(open_safetensors(base).key_shapes())
    before, after = open_safetensors(base), open_safetensors(out)
    expected: dict[str, torch.Tensor] = {}
    for ratio, adapter in ((0.6, a), (-0.3, b)):
        for name, target in adapter.targets.items():
            key = index.resolve(name).key
            delta = ratio * target.delta.reshape(before[key].shape)
            expected[key] = expected.get(key, 0) + delta
    assert len(expected) == result.patched_keys
    for key, delta in expected.items():
        torch.testing.assert_close(after[key] - before[key], delta, rtol=1e-4, atol=1e-6)


def test_ckpt_base_dtype_and_metadata(setup, tmp_path):
    folder, base, a, _ = setup
    sd = {k: v.clone() for k, v in open_safetensors(base).items()}
    ckpt = tmp_path / "base.ckpt"
    torch.save({"state_dict": sd, "global_step": 3}, ckpt)
    out = tmp_path / "half.safetensors"
    merge_checkpoint(MergeOptions(ckpt, [WeightedPath(a.path, 0.5)], out, dtype="fp16", title="Mine"))
    header = read_header(out)
    assert {t.dtype for t in header.tensors.values()} == {"F16"} and set(header.tensors) == set(sd)
    meta = header.metadata
    assert meta["modelspec.title"] == "Mine" and meta["modelspec.architecture"] == "stable-diffusion-v1"
    prov = json.loads(meta["loratools.merge"])
    assert prov["dtype"] == "fp16" and prov["adapters"][0]["file"] == "a.safetensors"


def test_base_metadata_is_kept_and_stale_hashes_recomputed(setup, tmp_path):
    _, base, a, _ = setup
    tagged = tmp_path / "tagged.safetensors"
    save_tensors(tagged, open_safetensors(base), {"ss_note": "keep me", "sshs_model_hash": "stale",
                                                  "modelspec.title": "Base Model", "modelspec.hash_sha256": "old"})
    out = tmp_path / "out.safetensors"
    merge_checkpoint(MergeOptions(tagged, [WeightedPath(a.path, 1.0)], out))
    meta = read_header(out).metadata
    assert meta["ss_note"] == "keep me" and meta["sshs_model_hash"] not in ("stale", "")
    assert "modelspec.hash_sha256" not in meta and meta["modelspec.merged_from"].startswith("Base Model, a")


def test_verify_catches_a_merge_that_applies_nothing(setup, tmp_path, monkeypatch):
    _, base, a, _ = setup
    import loratools.ops.merge.fuse as fuse

    monkeypatch.setattr(fuse, "_fused_lora", lambda patch, target: True)  # "applied", but nothing added
    result = merge_checkpoint(MergeOptions(base, [WeightedPath(a.path, 1.0)], tmp_path / "x.safetensors", verify=True))
    assert result.verified is False and all(not r.ok for r in result.verify)



def test_te_scale_zero_merges_the_unet_only(setup, tmp_path):
    _, base, a, _ = setup
    out = tmp_path / "unet-only.safetensors"
    merge_checkpoint(MergeOptions(base, [WeightedPath(a.path, 1.0)], out, te_scale=0.0))
    index = BaseIndex.from_key_shapes(open_safetensors(base).key_shapes())
    before, after = open_safetensors(base), open_safetensors(out)
    for name, target in a.targets.items():
        key = index.resolve(name).key
        changed = not torch.equal(before[key], after[key])
        assert changed == (target.component == "unet"), name

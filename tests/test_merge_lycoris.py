"""LyCORIS types merged into a checkpoint equal lycoris-lora's training forward at the same multiplier.

lycoris-lora's own merge path scales LoHa/LoKr twice when alpha != rank (formats-spec 1.4); the
forward pass used in training, ComfyUI and A1111 scale once, and that is what a merge must bake in.
DoRA (weight-norm formula, needs the base weight) is compared at ratio 1, where the tools agree;
full ``diff`` includes the bias diff of the conv; IA3 scales the base weight itself.
The layers are real layers of the tiny SD1 UNet (a 3x3 resnet conv and an attention linear); the
merged weights are read back from the written file.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from lycoris.modules.full import FullModule as LyFull
from lycoris.modules.ia3 import IA3Module as LyIA3
from lycoris.modules.locon import LoConModule as LyLoCon
from lycoris.modules.loha import LohaModule as LyLoha
from lycoris.modules.lokr import LokrModule as LyLokr
from torch import nn

from loratools.io import open_safetensors, save_tensors
from loratools.keys.index import BaseIndex
from loratools.keys.naming import underscored
from loratools.ops.merge import MergeOptions, WeightedPath, merge_checkpoint
from loratools.tiny import save_single_file
from loratools.tiny.adapters import target_modules



@pytest.fixture(scope="module")
def base(tiny_sd1, tmp_path_factory):
    return save_single_file(tiny_sd1, tmp_path_factory.mktemp("lycoris") / "sd1.safetensors")


def _layers(pipe):
    found = {}
    for component, path, layer in target_modules(pipe, "loha"):
        if component != "unet":
            continue
        kind = "conv" if isinstance(layer, nn.Conv2d) and layer.kernel_size == (3, 3) else (
            "linear" if isinstance(layer, nn.Linear) else None)
        if kind and kind not in found:
            found[kind] = (path, layer)
    return found


CASES = {
    "loha": (LyLoha, dict(lora_dim=4, alpha=2), 0.7),
    "lokr": (LyLokr, dict(lora_dim=2, alpha=1, factor=4, decompose_both=True), 0.7),
    "locon-tucker": (LyLoCon, dict(lora_dim=4, alpha=2, use_tucker=True), 0.7),
    "dora": (LyLoCon, dict(lora_dim=4, alpha=2, weight_decompose=True, wd_on_out=True), 1.0),
    "full": (LyFull, {}, 0.7),
    "ia3": (LyIA3, {}, 0.7),
}


@pytest.mark.parametrize("case", list(CASES))
def test_merged_weights_equal_lycoris_forward(tiny_sd1, base, tmp_path, case):
    cls, kwargs, ratio = CASES[case]
    torch.manual_seed(0)
    tensors, wrapped = {}, {}
    for kind, (path, layer) in _layers(tiny_sd1).items():
        name = "lora_unet_" + underscored(path)
        module = cls(name, copy.deepcopy(layer), ratio, **kwargs)
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0, 0.3 if case != "full" else 0.02)
        module.apply_to()
        wrapped[kind] = (name, layer, module)
        tensors.update({f"{name}.{k}": v.detach().clone() for k, v in module.state_dict().items()
                        if not k.startswith("org_")})
    lora = tmp_path / "lyco.safetensors"
    save_tensors(lora, tensors, {"ss_base_model_version": "sd_v1"})
    out = tmp_path / "merged.safetensors"
    result = merge_checkpoint(MergeOptions(base, [WeightedPath(lora, ratio)], out))
    assert result.adapters[0].applied == len(wrapped)

    index = BaseIndex.from_key_shapes(open_safetensors(base).key_shapes())
    merged = open_safetensors(out)
    for kind, (name, layer, module) in wrapped.items():
        target = index.resolve(name)
        w = merged[target.key].float()
        b = merged[target.bias_key].float() if target.bias_key else None
        if kind == "conv":
            x = torch.randn(2, layer.in_channels, 6, 6)
            got = F.conv2d(x, w, b, padding=layer.padding)
        else:
            x = torch.randn(3, layer.in_features)
            got = F.linear(x, w, b)
        with torch.no_grad():
            want = module(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_norm_deltas_merge_into_weight_and_bias(tiny_sd1, base, tmp_path):
    from lycoris.modules.norms import NormModule as LyNorm

    layer = tiny_sd1.unet.down_blocks[0].resnets[0].norm1
    name = "lora_unet_down_blocks_0_resnets_0_norm1"
    module = LyNorm(name, copy.deepcopy(layer), 0.7)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    module.apply_to()
    lora = tmp_path / "norm.safetensors"
    save_tensors(lora, {f"{name}.{k}": v.detach().clone() for k, v in module.state_dict().items()
                        if not k.startswith("org_")}, {"ss_base_model_version": "sd_v1"})
    out = tmp_path / "merged.safetensors"
    merge_checkpoint(MergeOptions(base, [WeightedPath(lora, 0.7)], out))
    target = BaseIndex.from_key_shapes(open_safetensors(base).key_shapes()).resolve(name)
    merged = open_safetensors(out)
    x = torch.randn(2, layer.num_channels, 4, 4)
    got = F.group_norm(x, layer.num_groups, merged[target.key].float(), merged[target.bias_key].float(), layer.eps)
    with torch.no_grad():
        torch.testing.assert_close(got, module(x), rtol=1e-5, atol=1e-5)

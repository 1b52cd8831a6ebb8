"""Synthetic adapters: kohya names, shapes, and deltas that real loaders and the formulas agree on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loratools.io.reader import open_safetensors
from loratools.tiny import build_pipeline, make_lora, render


def _manual_merge(arch, adapter):
    pipe = build_pipeline(arch)
    for target in adapter.targets.values():
        layer = getattr(pipe, target.component).get_submodule(target.module_path)
        layer.weight.data += target.delta
    return pipe


@pytest.mark.parametrize(("arch", "kind"), [("sd1", "locon"), ("sdxl", "locon")])  # locon covers lora's modules
def test_diffusers_loads_the_file_and_matches_the_ground_truth_deltas(arch, kind, tmp_path):
    pipe = build_pipeline(arch)
    base = render(pipe)
    adapter = make_lora(pipe, arch, kind, rank=4, alpha=2, path=tmp_path / "a.safetensors", dtype=torch.float32)
    pipe.load_lora_weights(str(adapter.path))
    loaded = render(pipe)
    merged = render(_manual_merge(arch, adapter))
    assert np.abs(loaded - base).max() > 0.02  # the adapter visibly changes the image
    np.testing.assert_allclose(loaded, merged, atol=1e-4)


def test_kohya_names_and_module_sets(tiny_sd1, tiny_sdxl):
    sd1 = make_lora(tiny_sd1, "sd1", "lora")
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in sd1.targets
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in sd1.targets
    assert not any("resnets" in n for n in sd1.targets)  # plain LoRA: attention + TE only
    # 3 TE layers x 6 + 4 transformers x 12 (8 attention, 2 ff, proj_in, proj_out)
    assert len(sd1.targets) == 18 + 48
    locon = make_lora(tiny_sd1, "sd1", "locon", conv_rank=2)
    extra = set(locon.targets) - set(sd1.targets)
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in extra
    assert "lora_unet_down_blocks_0_downsamplers_0_conv" in extra
    assert locon.tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (2, 32, 3, 3)
    assert locon.tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape == (32, 2, 1, 1)
    xl = make_lora(tiny_sdxl, "sdxl", "locon")
    names = set(xl.targets)
    # two levels, one resnet each: input_blocks 1 = level-0 resnet, 2 = downsampler, 3 = level 1
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn1_to_q" in names
    assert "lora_unet_input_blocks_2_0_op" in names and "lora_unet_output_blocks_1_2_conv" in names
    assert "lora_unet_middle_block_1_proj_in" in names
    assert "lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_2" in names
    assert "lora_unet_input_blocks_1_0_in_layers_2" in names
    assert "lora_te1_text_model_encoder_layers_2_mlp_fc2" in names
    assert "lora_te2_text_model_encoder_layers_0_self_attn_out_proj" in names
    assert not any(n.startswith("lora_unet_down_blocks") for n in names)
    diffusers_named = make_lora(tiny_sdxl, "sdxl", "lora", naming="kohya_diffusers")
    assert "lora_unet_down_blocks_1_attentions_0_proj_in" in diffusers_named.targets


def test_written_file_has_kohya_metadata_and_dtype(tiny_sd1, tmp_path):
    adapter = make_lora(tiny_sd1, "sd1", "lora", rank=8, alpha=4, path=tmp_path / "l.safetensors")
    reader = open_safetensors(adapter.path)
    assert reader.metadata["ss_network_dim"] == "8" and reader.metadata["ss_network_alpha"] == "4"
    assert reader.metadata["ss_base_model_version"] == "sd_v1"
    assert set(reader.keys()) == set(adapter.tensors)
    assert all(reader[k].dtype == torch.float16 for k in reader.keys())
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert float(reader[f"{name}.alpha"]) == 4.0


def _delta_from_tensors(t, shape):
    """Formats-spec 1.3/1.4 formulas, written independently of the generator."""
    if "lora_down.weight" in t:
        down, up = t["lora_down.weight"].float(), t["lora_up.weight"].float()
        r = down.shape[0]
        return (float(t["alpha"]) / r * up.reshape(up.shape[0], -1) @ down.reshape(r, -1)).reshape(shape)
    if "hada_w1_a" in t:
        r = t["hada_w1_b"].shape[0]
        core = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        return (float(t["alpha"]) / r * core).reshape(shape)
    if "lokr_w1" in t:
        if "lokr_w2_a" in t:
            w2, s = t["lokr_w2_a"] @ t["lokr_w2_b"], float(t["alpha"]) / t["lokr_w2_b"].shape[0]
        else:
            w2, s = t["lokr_w2"], 1.0
        w1 = t["lokr_w1"]
        if len(shape) == 4:
            w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
            w1 = w1[:, :, None, None]
        return (s * torch.kron(w1, w2)).reshape(shape)
    return t["diff"]


@pytest.mark.parametrize("kind", ["lora", "locon", "loha", "lokr", "full"])
def test_stored_tensors_encode_the_reported_delta(tiny_sdxl, kind):
    adapter = make_lora(tiny_sdxl, "sdxl", kind, rank=4, alpha=3, conv_rank=2, dtype=torch.float32)
    for name, target in adapter.targets.items():
        tensors = {k.split(".", 1)[1]: v for k, v in adapter.tensors.items() if k.split(".", 1)[0] == name}
        weight = getattr(tiny_sdxl, target.component).get_submodule(target.module_path).weight
        delta = _delta_from_tensors(tensors, weight.shape)
        torch.testing.assert_close(delta, target.delta, atol=1e-5, rtol=1e-4)
        assert 0.1 < float(delta.norm() / weight.norm()) < 0.3


def test_dora_scale_gives_the_reported_weight(tiny_sd1):
    adapter = make_lora(tiny_sd1, "sd1", "dora", dtype=torch.float32)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    t = {k.split(".", 1)[1]: v for k, v in adapter.tensors.items() if k.startswith(name + ".")}
    weight = tiny_sd1.unet.get_submodule(adapter.targets[name].module_path).weight
    v = weight + float(t["alpha"]) / 4 * t["lora_up.weight"] @ t["lora_down.weight"]
    expected = v * t["dora_scale"] / v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(weight + adapter.targets[name].delta, expected, atol=1e-5, rtol=1e-4)


def test_peft_naming_loads_in_diffusers(tmp_path):
    pipe = build_pipeline("sd1")
    adapter = make_lora(pipe, "sd1", "lora", naming="peft", dtype=torch.float32, path=tmp_path / "p.safetensors")
    assert any(k.startswith("unet.down_blocks.0.attentions.0.") and k.endswith(".lora_A.weight")
               for k in adapter.tensors)
    pipe.load_lora_weights(str(adapter.path))
    np.testing.assert_allclose(render(pipe), render(_manual_merge("sd1", adapter)), atol=1e-4)


def test_same_seed_same_tensors(tiny_sd1):
    a = make_lora(tiny_sd1, "sd1", "loha", seed=7)
    b = make_lora(tiny_sd1, "sd1", "loha", seed=7)
    c = make_lora(tiny_sd1, "sd1", "loha", seed=8)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert not all(torch.equal(a.tensors[k], c.tensors[k]) for k in a.tensors)


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr", "dora"])
def test_untrained_last_te_layer_is_all_zero_like_clip_skip_2(tiny_sd1, kind):
    adapter = make_lora(tiny_sd1, "sd1", kind, untrained_te_layers=1, dtype=torch.float32)
    last = [n for n in adapter.targets if n.startswith("lora_te_text_model_encoder_layers_2_")]
    assert len(last) == 6
    zero = {k for k, v in adapter.tensors.items() if k.endswith(("weight", "_a", "_b", "w2")) and not v.any()}
    assert len(zero) == 6 and all(k.split(".", 1)[0] in last for k in zero)
    assert all(not adapter.targets[n].delta.any() for n in last)
    assert adapter.targets["lora_te_text_model_encoder_layers_1_mlp_fc1"].delta.any()
    if kind == "dora":
        name = last[0]
        t = {k.split(".", 1)[1]: v for k, v in adapter.tensors.items() if k.startswith(name + ".")}
        weight = tiny_sd1.text_encoder.get_submodule(adapter.targets[name].module_path).weight
        torch.testing.assert_close(t["dora_scale"].flatten(), weight.norm(dim=1))

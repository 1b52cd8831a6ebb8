"""LoRA/LoCon module maths, max-norm, names and parameter groups of the built-in network."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from loratools.errors import UsageError
from trainer.network.lora import LoRAModule, apply_max_norm
from trainer.network.network import LoRANetwork, NetworkOptions, block_index

FIXTURES = Path(__file__).parent / "fixtures"
CONFIGS = Path(__file__).resolve().parents[1] / "trainer" / "configs"


def _randomise(module: LoRAModule, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=g))
        module.lora_down.weight.copy_(torch.randn(module.lora_down.weight.shape, generator=g))


def test_linear_lora_is_identity_at_init_and_adds_scaled_product():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    lora = LoRAModule("x", base, 3, alpha=1.5)
    lora.apply_to()
    x = torch.randn(2, 4, 6)
    ref = x @ base.weight.T + base.bias
    assert torch.equal(base(x), ref)  # lora_up is zero at init
    _randomise(lora, 1)
    expected = ref + (x @ lora.lora_down.weight.T @ lora.lora_up.weight.T) * (1.5 / 3)
    torch.testing.assert_close(base(x), expected)
    torch.testing.assert_close(lora.delta_weight(), lora.lora_up.weight @ lora.lora_down.weight * 0.5)
    lora.restore()
    assert torch.equal(base(x), ref)


def test_conv3x3_locon_matches_a_conv_with_the_composed_kernel():
    torch.manual_seed(0)
    base = nn.Conv2d(4, 6, 3, padding=1)
    lora = LoRAModule("c", base, 2, alpha=None)  # alpha None -> rank: scale 1
    assert lora.scale == 1.0 and float(lora.alpha) == 2.0
    assert lora.lora_down.kernel_size == (3, 3) and lora.lora_up.kernel_size == (1, 1)
    lora.apply_to()
    _randomise(lora, 2)
    # independent composition: dW[o, i, h, w] = sum_r up[o, r] down[r, i, h, w]
    dw = torch.einsum("or,rihw->oihw", lora.lora_up.weight[:, :, 0, 0], lora.lora_down.weight)
    x = torch.randn(1, 4, 7, 7)
    expected = nn.functional.conv2d(x, base.weight + dw, base.bias, padding=1)
    torch.testing.assert_close(base(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lora.delta_weight(), dw)


def test_dropouts_only_act_in_training():
    base = nn.Linear(8, 8)
    lora = LoRAModule("d", base, 4, 4, module_dropout=1.0, rank_dropout=0.5, dropout=0.5)
    lora.apply_to()
    _randomise(lora, 3)
    x = torch.randn(3, 8)
    lora.train()
    assert torch.equal(base(x), nn.functional.linear(x, base.weight, base.bias))  # module dropout p=1
    lora.eval()
    full = nn.functional.linear(x, base.weight, base.bias) + x @ lora.delta_weight().T
    torch.testing.assert_close(base(x), full)


def test_rank_dropout_masks_ranks_and_rescales():
    base = nn.Linear(5, 5, bias=False)
    nn.init.zeros_(base.weight)
    lora = LoRAModule("r", base, 4, 4, rank_dropout=0.5)
    lora.apply_to()
    _randomise(lora, 4)
    lora.train()
    torch.manual_seed(7)
    x = torch.randn(2, 3, 5)
    out = base(x)
    torch.manual_seed(7)
    _ = torch.randn(2, 3, 5)
    mask = (torch.rand(2, 4) > 0.5).unsqueeze(1)
    expected = ((x @ lora.lora_down.weight.T) * mask) @ lora.lora_up.weight.T * (1 / (1 - 0.5))
    torch.testing.assert_close(out, expected)


def _reference_max_norm(pairs, max_norm):
    """Independent max-norm: dense ΔW via einsum, clamp the Frobenius norm, scale both by sqrt."""
    scaled, norms, out = 0, [], []
    for up, down, alpha in pairs:
        rank = down.shape[0]
        if down.dim() == 4:
            dw = torch.einsum("or,rihw->oihw", up[:, :, 0, 0], down)
        else:
            dw = up @ down
        dw = dw * alpha / rank
        n = dw.norm().item()
        ratio = min(max(n, max_norm / 2), max_norm) / max(n, max_norm / 2)
        if ratio != 1:
            scaled += 1
        out.append((up * math.sqrt(ratio), down * math.sqrt(ratio)))
        norms.append(n * ratio)
    return scaled, sum(norms) / len(norms), max(norms), out


def test_scale_weight_norms_matches_reference():
    mods = [LoRAModule("a", nn.Linear(6, 5), 3, 3), LoRAModule("b", nn.Linear(6, 5), 2, 1),
            LoRAModule("c", nn.Conv2d(3, 4, 3), 2, 2), LoRAModule("d", nn.Linear(4, 4), 2, 2)]
    for i, m in enumerate(mods):
        _randomise(m, 10 + i)
    with torch.no_grad():
        mods[3].lora_up.weight.mul_(1e-3)  # small module: below max_norm/2, untouched
    pairs = [(m.lora_up.weight.detach().clone(), m.lora_down.weight.detach().clone(), float(m.alpha)) for m in mods]
    exp_scaled, exp_mean, exp_max, exp_weights = _reference_max_norm(pairs, 1.0)
    scaled, mean, mx = apply_max_norm(mods, 1.0)
    assert scaled == exp_scaled == 3
    assert mean == pytest.approx(exp_mean, rel=1e-5) and mx == pytest.approx(exp_max, rel=1e-5)
    for m, (up, down) in zip(mods, exp_weights):
        torch.testing.assert_close(m.lora_up.weight, up)
        torch.testing.assert_close(m.lora_down.weight, down)
        assert m.delta_weight().norm() <= 1.0 + 1e-5


def _meta_models(arch: str):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def cfg(name):
        return json.loads((CONFIGS / arch / f"{name}.json").read_text())

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config({k: v for k, v in cfg("unet").items() if not k.startswith("_")})
        tes = [CLIPTextModel(CLIPTextConfig(**cfg("text_encoder")))]
        if arch == "sdxl":
            tes.append(CLIPTextModelWithProjection(CLIPTextConfig(**cfg("text_encoder_2"))))
    return unet, tes


def _fixture(name: str) -> tuple[dict[str, list[int]], dict[str, str]]:
    data = json.loads((FIXTURES / name).read_text())
    modules = {k.split(".")[0]: v["shape"] for k, v in data["tensors"].items() if k.endswith("lora_down.weight")}
    return modules, data["metadata"]


@pytest.mark.parametrize(("arch", "fixture"), [
    ("sd1", "lora_kohya_sd15_locon.json"), ("sd1", "lora_kohya_sd15_lora.json"),
    ("sdxl", "lora_kohya_sdxl_locon.json"), ("sdxl", "lora_kohya_sdxl_lora.json"),
])
def test_real_size_module_names_and_ranks_match_sd_scripts(arch, fixture):
    """Built on the meta device from the shipped real configs with the fixture's own settings:
    the same module names and down shapes as the file sd-scripts wrote."""
    unet, tes = _meta_models(arch)
    expected, meta = _fixture(fixture)
    args = json.loads(meta["ss_network_args"]) if meta.get("ss_network_args", "None") != "None" else {}
    opts = NetworkOptions.from_args(arch, int(meta["ss_network_dim"]), float(meta["ss_network_alpha"]), None, args)
    with torch.device("meta"):
        net = LoRANetwork(arch, unet, tes, opts)
    got = {m.lora_name: list(m.lora_down.weight.shape) for m in net.all_loras}
    assert got.keys() == expected.keys()
    assert got == expected


def test_block_dims_and_zero_rank_skip_on_tiny_sd1(tiny_sd1):
    dims = ["4"] * 25
    dims[12] = "0"  # slot 12 = mid block: off
    opts = NetworkOptions.from_args("sd1", 4, 1, None, {"block_dims": ",".join(dims), "block_alphas": ",".join(["2"] * 25)})
    net = LoRANetwork("sd1", tiny_sd1.unet, [tiny_sd1.text_encoder], opts)
    names = [m.lora_name for m in net.unet_loras]
    assert names and not any("mid_block" in n for n in names)
    assert any("mid_block" in n for n in net.skipped)
    assert all(float(m.alpha) == 2.0 for m in net.unet_loras)
    assert all(float(m.alpha) == 1.0 for m in net.text_encoder_loras)  # the TE uses network_alpha
    with pytest.raises(UsageError, match="25"):
        NetworkOptions.from_args("sd1", 4, 1, None, {"block_dims": ",".join(["4"] * 26)})


def test_block_index_tables():
    assert block_index("lora_unet_down_blocks_0_attentions_1_proj_in", "sd1") == 2
    assert block_index("lora_unet_down_blocks_2_downsamplers_0_conv", "sd1") == 9
    assert block_index("lora_unet_mid_block_attentions_0_proj_in", "sd1") == 12
    assert block_index("lora_unet_up_blocks_0_resnets_0_conv1", "sd1") == 13
    assert block_index("lora_unet_up_blocks_3_attentions_2_proj_out", "sd1") == 24  # OUT11, the last of 25
    assert block_index("lora_unet_input_blocks_4_1_proj_in", "sdxl") == 5
    assert block_index("lora_unet_middle_block_1_proj_in", "sdxl") == 11
    assert block_index("lora_unet_output_blocks_8_0_skip_connection", "sdxl") == 21


def test_param_groups_loraplus_and_zero_lr_drop(tiny_sdxl):
    opts = NetworkOptions.from_args("sdxl", 4, 1, None, {"loraplus_unet_lr_ratio": "16"})
    net = LoRANetwork("sdxl", tiny_sdxl.unet, [tiny_sdxl.text_encoder, tiny_sdxl.text_encoder_2], opts)
    groups, desc = net.prepare_optimizer_params([1e-4, 0.0], 2e-4, 1e-3)
    assert desc == ["textencoder1", "unet", "unet plus"]  # TE2 lr 0: dropped
    assert [g["lr"] for g in groups] == [1e-4, 2e-4, 2e-4 * 16]
    n_up = sum(1 for m in net.unet_loras)
    assert len(groups[2]["params"]) == n_up
    te_names = [m.lora_name for m in net.text_encoder_loras]
    assert all(n.startswith(("lora_te1_text_model_", "lora_te2_text_model_")) for n in te_names)
    assert any(n.startswith("lora_unet_input_blocks_") for n in (m.lora_name for m in net.unet_loras))


def test_continue_from_weights_with_per_layer_ranks(tiny_sd1):
    opts = NetworkOptions.from_args("sd1", 4, 2, None, {"conv_dim": "2"})
    net = LoRANetwork("sd1", tiny_sd1.unet, [tiny_sd1.text_encoder], opts)
    for i, m in enumerate(net.all_loras):
        _randomise(m, i)
    sd = net.kohya_state_dict()
    # "resize": module 0 keeps rank 1, the others as they are, and one module is dropped
    first = net.all_loras[0].lora_name
    dropped = net.all_loras[1].lora_name
    sd[f"{first}.lora_down.weight"] = sd[f"{first}.lora_down.weight"][:1]
    sd[f"{first}.lora_up.weight"] = sd[f"{first}.lora_up.weight"][:, :1]
    sd[f"{first}.alpha"] = torch.tensor(1.0)
    sd = {k: v for k, v in sd.items() if not k.startswith(dropped + ".")}
    again = LoRANetwork("sd1", tiny_sd1.unet, [tiny_sd1.text_encoder],
                        NetworkOptions.from_args("sd1", 8, 8, None, {}), weights=sd)
    got = again.kohya_state_dict()
    assert got.keys() == sd.keys()
    for k in sd:
        torch.testing.assert_close(got[k], sd[k].float())
    assert dict((m.lora_name, m.lora_dim) for m in again.all_loras)[first] == 1


def test_base_weights_are_merged_with_their_multiplier(tmp_path):
    from loratools.io.writer import save_tensors
    from loratools.tiny import build_pipeline
    from trainer.base_weights import merge_base_weights

    pipe = build_pipeline("sd1")
    net = LoRANetwork("sd1", pipe.unet, [pipe.text_encoder], NetworkOptions.from_args("sd1", 2, 1, None, {}))
    for i, m in enumerate(net.all_loras):
        _randomise(m, 100 + i)
    target = net.unet_loras[0]
    expected = target.org_module.weight.detach().clone() + 0.5 * target.delta_weight().reshape(target.org_module.weight.shape)
    file = tmp_path / "base.safetensors"
    save_tensors(file, net.kohya_state_dict())
    fresh = build_pipeline("sd1")
    merged = merge_base_weights("sd1", fresh.unet, [fresh.text_encoder], [str(file)], [0.5])
    assert merged == len(net.all_loras)
    module = dict(fresh.unet.named_modules())[next(p for p, mm in pipe.unet.named_modules() if mm is target.org_module)]
    torch.testing.assert_close(module.weight, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(UsageError, match="one per file"):
        merge_base_weights("sd1", fresh.unet, [fresh.text_encoder], [str(file)], [0.5, 1.0])


@pytest.mark.parametrize(("arch", "count"), [("sd1", 25), ("sdxl", 23)])
def test_block_dims_cover_every_real_size_unet_module(arch, count):
    """Each slot gets its own rank: every UNet module of the real model lands in a valid slot."""
    unet, tes = _meta_models(arch)
    dims = ",".join(str(2 + i) for i in range(count))
    opts = NetworkOptions.from_args(arch, 4, 1, None, {"block_dims": dims, "conv_block_dims": dims})
    with torch.device("meta"):
        net = LoRANetwork(arch, unet, tes, opts)
    used = set()
    for m in net.unet_loras:
        idx = block_index(m.lora_name, arch)
        assert 0 < idx < count and m.lora_dim == 2 + idx
        used.add(idx)
    # SDXL slot 1 is input_blocks.0 (conv_in) and slot 22 is out: sd-scripts puts no LoRA there
    assert used == (set(range(1, 25)) if arch == "sd1" else set(range(2, 22)))


def test_block_lr_weights_make_per_block_groups(tiny_sd1):
    from trainer.network.network import block_lr_weights

    notes: list[str] = []
    down, mid, up = block_lr_weights("linear", "0.5", "0,1,1", 0.05, notes)
    assert down[0] == 0.0 and down[11] == pytest.approx(1.0) and down[1] == pytest.approx(1 / 11)
    assert mid == 0.5 and up == [0.0] + [1.0] * 11 and "padded" in notes[0]
    opts = NetworkOptions.from_args("sd1", 4, 1, None, {"down_lr_weight": "zeros+0.25", "mid_lr_weight": "0",
                                                        "up_lr_weight": "2,2,2,2,2,2,2,2,2,2,2,2"})
    net = LoRANetwork("sd1", tiny_sd1.unet, [tiny_sd1.text_encoder], opts)
    groups, desc = net.prepare_optimizer_params(None, 1e-3, 1e-3)
    lrs = dict(zip(desc, (g["lr"] for g in groups)))
    assert lrs["textencoder"] == 1e-3
    assert lrs["unet_block1"] == pytest.approx(2.5e-4)  # down_blocks.0.attentions.0
    assert "unet_block12" not in lrs  # mid weight 0: group dropped
    assert lrs["unet_block16"] == pytest.approx(2e-3)  # up_blocks.1.attentions.0 (OUT03)
    with pytest.raises(UsageError, match="SD1/SD2"):
        NetworkOptions.from_args("sdxl", 4, 1, None, {"up_lr_weight": "1"})

"""lycoris.kohya networks through lycoris-lora: file layout identical to sd-scripts + LyCORIS
(the real-size SDXL fixtures), every algorithm readable by loratools' own parser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainer.network.lycoris_net import LycorisAdapter

FIXTURES = Path(__file__).parent / "fixtures"
CONFIGS = Path(__file__).resolve().parents[1] / "trainer" / "configs"


@pytest.fixture(scope="module")
def real_sdxl():
    """Real-size SDXL UNet and text encoders on the meta device (names and shapes only)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def cfg(name):
        return json.loads((CONFIGS / "sdxl" / f"{name}.json").read_text())

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config({k: v for k, v in cfg("unet").items() if not k.startswith("_")})
        tes = [CLIPTextModel(CLIPTextConfig(**cfg("text_encoder"))),
               CLIPTextModelWithProjection(CLIPTextConfig(**cfg("text_encoder_2")))]
    return unet, tes


def test_real_size_sd1_preset_full_matches_kohya_locon_plus_the_four_named_layers():
    """SD1 LyCORIS `preset=full` (the bug: "duplicated lora name: lora_unet_time_embedding_linear_1"):
    the kohya LoCon module set of a real SD1.5 file, plus conv_in, conv_out and the two
    time-embedding linears once each, under their diffusers-style names as in real SD1.5 LyCORIS files."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    def cfg(name):
        return json.loads((CONFIGS / "sd1" / f"{name}.json").read_text())

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config({k: v for k, v in cfg("unet").items() if not k.startswith("_")})
        te = CLIPTextModel(CLIPTextConfig(**cfg("text_encoder")))
    net = LycorisAdapter("sd1", unet, [te], 8, 4, None, {"algo": "locon", "preset": "full", "conv_dim": "8",
                                                         "conv_alpha": "1"}, train_unet=True, train_text_encoder=True)
    got = {k.split(".")[0] for k in net.kohya_state_dict()}
    kohya_locon = {k.split(".")[0] for k in json.loads((FIXTURES / "lora_kohya_sd15_locon.json").read_text())["tensors"]}
    extra = {"lora_unet_conv_in", "lora_unet_conv_out", "lora_unet_time_embedding_linear_1",
             "lora_unet_time_embedding_linear_2"}
    assert got == kohya_locon | extra
    assert net.module_count() == len(kohya_locon) + 4


@pytest.mark.parametrize("fixture", ["lora_lycoris_sdxl_locon.json", "lora_lycoris_sdxl_loha.json",
                                     "lora_lycoris_sdxl_lokr.json", "lora_lycoris_sdxl_locon_tucker.json"])
def test_real_size_sdxl_files_match_sd_scripts_lycoris(real_sdxl, fixture):
    """Same tensor names and shapes as the file sd-scripts + LyCORIS wrote with the same args
    (the locon fixture is the Hungarian guide's command: block_dims/block_alphas ignored)."""
    data = json.loads((FIXTURES / fixture).read_text())
    meta = data["metadata"]
    args = json.loads(meta["ss_network_args"])
    unet, tes = real_sdxl
    net = LycorisAdapter("sdxl", unet, tes, int(meta["ss_network_dim"]), float(meta["ss_network_alpha"]), None, args,
                         train_unet=True, train_text_encoder=True)
    got = {k: list(v.shape) for k, v in net.kohya_state_dict().items()}
    assert got == {k: v["shape"] for k, v in data["tensors"].items()}
    if "block_dims" in args:
        assert any("block_dims" in w for w in net.ignored) and any("block_alphas" in w for w in net.ignored)


KINDS = {"locon": "lora", "loha": "loha", "lokr": "lokr", "ia3": "ia3", "full": "full", "dylora": "lora"}


@pytest.mark.parametrize("algo", list(KINDS))
def test_every_algorithm_is_read_back_by_parse_adapter(algo):
    from loratools.adapters import parse_adapter
    from loratools.tiny import build_pipeline

    pipe = build_pipeline("sdxl")
    args = {"algo": algo, "preset": "ia3" if algo == "ia3" else "full", "conv_dim": "2", "conv_alpha": "1"}
    if algo == "lokr":
        args["factor"] = "4"
    if algo == "dylora":
        args["conv_dim"] = "4"  # ranks must be multiples of block_size (4)
    net = LycorisAdapter("sdxl", pipe.unet, [pipe.text_encoder, pipe.text_encoder_2], 4, 2, None, args,
                         train_unet=True, train_text_encoder=True)
    tensors = net.kohya_state_dict()
    with torch.no_grad():  # non-zero factors so that nothing looks untrained
        for v in tensors.values():
            if v.dim() > 0:
                v.normal_()
    parsed = parse_adapter(tensors)
    assert not parsed.unknown
    names = {k.split(".")[0] for k in tensors}
    assert set(parsed.modules) == names
    assert {m.kind for m in parsed.modules.values()} == {KINDS[algo]}
    assert any(n.startswith("lora_unet_input_blocks_") for n in names)
    if algo != "ia3":
        assert any(n.startswith("lora_te2_text_model_encoder_layers_") for n in names)
    if algo == "dylora":
        return  # lycoris' DyLoRA module cannot load the lora_up/lora_down layout it saves
    # round trip through the kohya names
    fresh = build_pipeline("sdxl")
    again = LycorisAdapter("sdxl", fresh.unet, [fresh.text_encoder, fresh.text_encoder_2], 4, 2, None, args,
                           train_unet=True, train_text_encoder=True, weights=tensors)
    back = again.kohya_state_dict()
    assert back.keys() == tensors.keys()
    for k in tensors:  # "full" stores base + diff, so the diff comes back to float rounding
        torch.testing.assert_close(back[k], tensors[k], atol=1e-5, rtol=1e-5)


def test_attn_only_trains_diffusers_attention_and_warns_for_ignored_args(tiny_sd1):
    net = LycorisAdapter("sd1", tiny_sd1.unet, [tiny_sd1.text_encoder], 4, 1, None,
                         {"preset": "attn-only", "use_reentrant": "False"}, train_unet=True, train_text_encoder=False)
    names = list(net.kohya_state_dict())
    assert names and all("_attn1_" in n or "_attn2_" in n for n in names)
    assert any("use_reentrant" in w for w in net.ignored)


def test_loraplus_flag_reaches_lycoris_param_groups(tiny_sd1):
    """`--loraplus_lr_ratio` (a flag, not a network_arg) gives lycoris' up factors lr x ratio."""
    from types import SimpleNamespace

    from trainer.network import create_network

    cfg = SimpleNamespace(network_module="lycoris.kohya", network_dim=4, network_alpha=1, network_dropout=None,
                          loraplus_lr_ratio=8.0, loraplus_unet_lr_ratio=None, loraplus_text_encoder_lr_ratio=None)
    net = create_network(cfg, "sd1", tiny_sd1.unet, [tiny_sd1.text_encoder], {"algo": "locon"},
                         train_unet=True, train_text_encoder=False)
    groups, descriptions = net.prepare_optimizer_params(None, 1e-4, 1e-4)
    by_lr = {g["lr"]: sum(p.numel() for p in g["params"]) for g in groups}
    assert set(by_lr) == {1e-4, 8e-4}
    ups = sum(p.numel() for n, p in net.named_parameters() if "lora_up" in n)
    assert by_lr[8e-4] == ups
    assert any("plus" in d for d in descriptions)


PRESET_UNET_PARTS = {  # what each built-in preset may wrap in an SD1 UNet (diffusers-style kohya names)
    "full": None,
    "full-lin": None,
    # lycoris lists the TimestepEmbedding class in these two; sd-scripts' SD1 UNet has that class too
    "attn-mlp": ("_attentions_", "_time_embedding_"),
    "attn-only": ("_attn1_", "_attn2_"),
    "unet-transformer-only": ("_attentions_", "_time_embedding_"),
    "unet-convblock-only": ("_resnets_", "_downsamplers_", "_upsamplers_", "_conv_in", "_conv_out", "_time_embedding_"),
}


@pytest.mark.parametrize("preset", list(PRESET_UNET_PARTS))
def test_every_seed_preset_builds_on_sd1_and_reads_back(tiny_sd1, preset):
    from loratools.adapters import parse_adapter

    net = LycorisAdapter("sd1", tiny_sd1.unet, [tiny_sd1.text_encoder], 4, 1, None,
                         {"algo": "locon", "preset": preset, "conv_dim": "2", "conv_alpha": "1"},
                         train_unet=True, train_text_encoder=True)
    tensors = net.kohya_state_dict()
    names = {k.split(".")[0] for k in tensors}
    assert len(names) == net.module_count()  # no module twice
    unet = [n for n in names if n.startswith("lora_unet_")]
    assert unet
    parts = PRESET_UNET_PARTS[preset]
    if parts is not None:
        assert all(any(p in n for p in parts) for n in unet), [n for n in unet if not any(p in n for p in parts)][:5]
    if preset == "full-lin":  # no 3x3 convs without enable_conv
        assert all(tensors[f"{n}.lora_down.weight"].shape[-1] == 1 for n in unet if tensors[f"{n}.lora_down.weight"].dim() == 4)
    with torch.no_grad():
        for v in tensors.values():
            if v.dim() > 0:
                v.normal_()
    parsed = parse_adapter(tensors)
    assert not parsed.unknown and set(parsed.modules) == names


def test_use_scalar_train_norm_and_rank_dropout_scale(tiny_sd1):
    from loratools.adapters import parse_adapter

    net = LycorisAdapter("sd1", tiny_sd1.unet, [tiny_sd1.text_encoder], 4, 1, None,
                         {"algo": "locon", "preset": "full", "use_scalar": "True", "train_norm": "True",
                          "rank_dropout_scale": "True", "rank_dropout": "0.1"},
                         train_unet=True, train_text_encoder=True)
    assert all(m.rank_dropout_scale for m in net.net.loras)
    tensors = net.kohya_state_dict()
    norms = {k.split(".")[0] for k in tensors if k.endswith(".w_norm")}
    assert any(n.startswith("lora_unet_") and "_norm1" in n for n in norms)
    scalars = [m.scalar for m in net.net.loras if isinstance(getattr(m, "scalar", None), torch.nn.Parameter)]
    assert scalars and all(float(s.detach()) == 0 for s in scalars)  # trainable, starting at 0
    # files hold lora_up x scalar (as sd-scripts + LyCORIS save them): zero until the scalar moves
    assert not any(k.endswith(".scalar") for k in tensors)
    ups = [v for k, v in tensors.items() if k.endswith("lora_up.weight")]
    assert ups and all(not v.any() for v in ups)
    assert any(m.lora_up.weight.any() for m in net.net.loras if hasattr(m, "lora_up"))
    with torch.no_grad():
        for v in tensors.values():
            if v.dim() > 0:
                v.normal_()
    parsed = parse_adapter(tensors)
    assert not parsed.unknown
    assert {parsed.modules[n].kind for n in norms} == {"norm"}

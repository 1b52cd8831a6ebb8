"""The released models' weights without a file (`keys.standard`): exactly the real key lists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loratools.keys.index import BaseIndex
from loratools.keys.standard import clip_key_shapes, standard_key_shapes, unet_key_shapes

FIXTURES = Path(__file__).parent / "fixtures"
CONFIGS = Path(__file__).parents[1] / "trainer" / "configs"


def _folder(name: str) -> dict[str, dict[str, tuple[int, ...]]]:
    files = json.loads((FIXTURES / name).read_text())["files"]
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for f, keys in files.items():
        component = f.split("/")[0]
        if component != "vae":
            out[component] = {k: tuple(v["shape"]) for k, v in keys.items() if not k.endswith("position_ids")}
    return out


@pytest.mark.parametrize("arch,folder", [("sd1", "diffusers_sd15.json"), ("sdxl", "diffusers_sdxl.json")])
def test_standard_tables_equal_the_real_folders(arch, folder):
    # every weight and bias of the real SD1.5 / SDXL-base folders (fixtures), with its shape
    assert standard_key_shapes(arch) == _folder(folder)


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_generator_equals_the_models_diffusers_and_transformers_build(arch, request):
    # an independent computation: the live modules' own state dicts, for the tiny pipelines and
    # (on the meta device) for the released configs shipped with the trainer, SD2 included
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def live(model, te: bool = False) -> dict[str, tuple[int, ...]]:
        # transformers 5's CLIPTextModel has no `text_model.` level; the tables always carry it
        def name(k: str) -> str:
            return k if not te or k.startswith(("text_model.", "text_projection")) else "text_model." + k

        return {name(k): tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}

    from loratools.tiny import build_pipeline

    pipe = request.getfixturevalue(f"tiny_{arch}") if arch != "sd2" else build_pipeline("sd2")
    assert unet_key_shapes(pipe.unet.config) == live(pipe.unet)
    for te, projection in ((pipe.text_encoder, False), (getattr(pipe, "text_encoder_2", None), True)):
        if te is not None:
            assert clip_key_shapes(te.config, projection=projection) == live(te, te=True)

    def cfg(name):
        return json.loads((CONFIGS / arch / f"{name}.json").read_text())

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config({k: v for k, v in cfg("unet").items() if not k.startswith("_")})
        tes = {"text_encoder": CLIPTextModel(CLIPTextConfig(**cfg("text_encoder")))}
        if arch == "sdxl":
            tes["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**cfg("text_encoder_2")))
    standard = standard_key_shapes(arch)
    assert standard["unet"] == live(unet)
    for component, te in tes.items():
        assert standard[component] == live(te, te=True), component


def test_standard_index_is_marked_and_shared():
    index = BaseIndex.standard("sdxl")
    assert index.source == "standard" and index.arch.arch == "sdxl" and index.layout == "diffusers"
    assert BaseIndex.standard("sdxl") is index  # built once per process
    target = index.resolve("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k")
    assert target.key == "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.weight" and target.shape == (640, 2048)
    with pytest.raises(ValueError, match="sd3"):
        BaseIndex.standard("sd3")

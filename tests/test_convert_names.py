"""convert's vocabulary at full scale: every module of every fixture LoRA resolves against the
released model's standard index with a fitting shape, and kohya names come back exactly as
sd-scripts writes them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from loratools.adapters import parse_adapter
from loratools.keys.index import BaseIndex
from loratools.keys.resolve import module_shapes, place_modules

FIXTURES = Path(__file__).parent / "fixtures"
_DTYPES = {"F16": torch.float16, "F32": torch.float32}


def _load(name: str):
    fixture = json.loads((FIXTURES / name).read_text())
    tensors = {k: torch.tensor(4.0) if k.endswith(".alpha") else
               torch.empty(v["shape"], dtype=_DTYPES[v["dtype"]], device="meta") for k, v in fixture["tensors"].items()}
    return parse_adapter(tensors, fixture.get("metadata"))


def _diffusers_weights(name: str) -> dict[str, dict[str, tuple[int, ...]]]:
    files = json.loads((FIXTURES / name).read_text())["files"]
    return {f.split("/")[0]: {k: tuple(v["shape"]) for k, v in keys.items()} for f, keys in files.items()}


CASES = [
    ("lora_kohya_sd15_lora.json", "sd1", "diffusers_sd15.json"),
    ("lora_kohya_sd15_locon.json", "sd1", "diffusers_sd15.json"),
    ("lora_kohya_sdxl_lora.json", "sdxl", "diffusers_sdxl.json"),
    ("lora_kohya_sdxl_locon.json", "sdxl", "diffusers_sdxl.json"),
    ("lora_lycoris_sdxl_loha.json", "sdxl", "diffusers_sdxl.json"),
    ("lora_lycoris_sdxl_lokr.json", "sdxl", "diffusers_sdxl.json"),
    ("lora_lycoris_sdxl_locon_tucker.json", "sdxl", "diffusers_sdxl.json"),
    ("lora_peft_sdxl.json", "sdxl", "diffusers_sdxl.json"),
    ("lora_diffusers_sdxl_trainscript.json", "sdxl", "diffusers_sdxl.json"),
]


@pytest.mark.parametrize("lora,arch,folder", CASES, ids=[c[0].removesuffix(".json") for c in CASES])
def test_every_module_locates_a_real_diffusers_weight(lora, arch, folder):
    adapter = _load(lora)
    weights = _diffusers_weights(folder)
    index = BaseIndex.standard(arch)
    placed = place_modules(module_shapes(adapter), index)
    assert placed.unresolved == []
    for name, module in adapter.modules.items():
        p = placed.placed[name]
        info = index.info(p.target)
        shape = weights[info.component].get(info.path + ".weight")
        assert shape is not None, (name, info.path)
        assert p.fits and math.prod(shape) == math.prod(module.weight_shape), name
        if lora.startswith(("lora_kohya", "lora_lycoris")):
            assert p.write_name == name  # sd-scripts' own spelling


def test_peft_sdxl_converts_to_the_names_sd_scripts_writes():
    peft = _load("lora_peft_sdxl.json")
    kohya = set(_load("lora_kohya_sdxl_lora.json").modules)
    placed = place_modules(module_shapes(peft), BaseIndex.standard("sdxl")).placed
    converted = {p.write_name for p in placed.values()}
    assert len(converted) == len(peft.modules) and converted <= kohya


def test_kohya_sdxl_converts_to_the_keys_diffusers_saves():
    kohya = _load("lora_kohya_sdxl_lora.json")
    peft_modules = {k.rsplit(".lora_", 1)[0] for k in json.loads((FIXTURES / "lora_peft_sdxl.json").read_text())["tensors"]}
    index = BaseIndex.standard("sdxl")
    converted = {index.peft_name(p.target) for p in place_modules(module_shapes(kohya), index).placed.values()}
    assert peft_modules <= converted


def test_unknown_module_names_do_not_resolve():
    index = BaseIndex.standard("sd1")
    assert index.resolve("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") is not None
    for name in ("lora_unet_down_blocks_9_attentions_0_proj_in", "lora_te_text_model_encoder_layers_0_self_attn",
                 "lora_te3_text_model_encoder_layers_0_mlp_fc1", "lora_unet_down_blocks_0_attentions_0_proj",
                 "lora_unet_down_blocks_0_attentions_0_transformer_blocks_1_attn1_to_q"):  # SD1 depth is 1
        assert index.resolve(name) is None, name

"""LoRA module name -> base weight, at full scale (fixtures) and on tiny real models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loratools.errors import InvalidFileError
from loratools.keys.index import BaseIndex, shapes_compatible

FIXTURES = Path(__file__).parent / "fixtures"
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason="fixtures folder not found")
BASES = {"sd1": ("ckpt_sd15_single_file.json", "diffusers_sd15.json"),
         "sdxl": ("ckpt_sdxl_single_file.json", "diffusers_sdxl.json")}
LORAS = sorted(p.name for p in FIXTURES.glob("lora_*.json")) if FIXTURES.is_dir() else []


def _load(name):
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture(scope="module")
def indexes():
    out = {}
    for arch, (single, folder) in BASES.items():
        out[arch, "single_file"] = BaseIndex.from_key_shapes(
            {k: tuple(v["shape"]) for k, v in _load(single)["tensors"].items()})
        out[arch, "diffusers"] = BaseIndex.from_key_shapes(
            {f.split("/")[0]: {k: tuple(v["shape"]) for k, v in t.items()} for f, t in _load(folder)["files"].items()})
    return out


def _header(name):
    from loratools.adapters import describe_header

    data = _load(name)
    return data, describe_header({k: tuple(v["shape"]) for k, v in data["tensors"].items()}, data.get("metadata"))


@needs_fixtures
@pytest.mark.parametrize("layout", ["single_file", "diffusers"])
@pytest.mark.parametrize("name", LORAS)
def test_every_fixture_module_maps_with_matching_shape(indexes, name, layout):
    data, header = _header(name)
    index = indexes["sd1" if "sd15" in name else "sdxl", layout]
    assert index.layout == layout
    counts = data["module_counts"]
    assert len(header.modules) == counts.get("total_modules", len(header.modules))
    assert not header.unknown
    targets = []
    for module_name, module in header.modules.items():
        target = index.resolve(module_name)
        assert target is not None, module_name
        assert shapes_compatible(module.weight_shape, target.shape), (module_name, module.weight_shape, target)
        targets.append((target.component, target.key, target.rows))
    assert len(set(targets)) == len(targets)  # no two modules on one weight
    # module counts per prefix equal the README's (PEFT files count by diffusers component)
    from loratools.keys.naming import split_kohya_prefix

    by_prefix: dict[str, int] = {}
    for n in header.modules:
        prefix = split_kohya_prefix(n)[0]
        by_prefix[prefix] = by_prefix.get(prefix, 0) + 1
    readme_key = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    expected = {readme_key.get(k, k): v for k, v in counts.items() if k.startswith("lora_") or k in readme_key}
    assert by_prefix == expected


@needs_fixtures
def test_sd1_upsampler_is_sub_index_1_and_sdxl_2(indexes):
    sd1 = indexes["sd1", "single_file"].resolve("lora_unet_up_blocks_0_upsamplers_0_conv")
    assert sd1.key == "model.diffusion_model.output_blocks.2.1.conv.weight"
    sdxl = indexes["sdxl", "single_file"]
    assert sdxl.resolve("lora_unet_up_blocks_0_upsamplers_0_conv").key == "model.diffusion_model.output_blocks.2.2.conv.weight"
    assert sdxl.resolve("lora_unet_output_blocks_2_2_conv") == sdxl.resolve("lora_unet_up_blocks_0_upsamplers_0_conv")
    assert sdxl.resolve("lora_unet_output_blocks_2_1_conv") is None
    folder = indexes["sd1", "diffusers"].resolve("lora_unet_output_blocks_2_1_conv")
    assert (folder.component, folder.key) == ("unet", "up_blocks.0.upsamplers.0.conv.weight")


@needs_fixtures
def test_openclip_q_k_v_are_row_slices_in_order(indexes):
    index = indexes["sdxl", "single_file"]
    prefix = "conditioner.embedders.1.model.transformer.resblocks.5.attn."
    for i, p in enumerate("qkv"):
        t = index.resolve(f"lora_te2_text_model_encoder_layers_5_self_attn_{p}_proj")
        assert (t.key, t.rows, t.shape, t.bias_key) == (
            prefix + "in_proj_weight", (i * 1280, (i + 1) * 1280), (1280, 1280), prefix + "in_proj_bias")
        assert index.resolve(f"text_encoder_2.text_model.encoder.layers.5.self_attn.{p}_proj") == t
    fc2 = index.resolve("lora_te2_text_model_encoder_layers_31_mlp_fc2")
    assert (fc2.key, fc2.rows) == ("conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_proj.weight", None)


@needs_fixtures
def test_sd1_lora_does_not_fit_an_sdxl_base(indexes):
    from loratools.errors import ArchitectureMismatchError
    from loratools.keys.arch import check_compatible, detect_adapter_arch

    _, header = _header("lora_kohya_sd15_lora.json")
    index = indexes["sdxl", "single_file"]
    with pytest.raises(ArchitectureMismatchError, match="SD1 adapter .* SDXL base"):
        check_compatible(detect_adapter_arch(header), index.arch)
    fitting = [n for n, m in header.modules.items()
               if (t := index.resolve(n)) is not None and shapes_compatible(m.weight_shape, t.shape)]
    assert len(fitting) < len(header.modules) // 2


@needs_fixtures
def test_transformers_4_and_5_folders_both_resolve():
    folder = {f.split("/")[0]: {k: tuple(v["shape"]) for k, v in t.items()}
              for f, t in _load("diffusers_sd15.json")["files"].items()}
    v5 = dict(folder, text_encoder={k.removeprefix("text_model."): s for k, s in folder["text_encoder"].items()})
    name = "lora_te_text_model_encoder_layers_3_mlp_fc1"
    t4 = BaseIndex.from_key_shapes(folder).resolve(name)
    t5 = BaseIndex.from_key_shapes(v5).resolve(name)
    assert t4.key == "text_model.encoder.layers.3.mlp.fc1.weight"
    assert t5.key == "encoder.layers.3.mlp.fc1.weight"
    assert t4.shape == t5.shape == (3072, 768)
    for peft in ("text_encoder.text_model.encoder.layers.3.mlp.fc1", "text_encoder.encoder.layers.3.mlp.fc1"):
        assert BaseIndex.from_key_shapes(v5).resolve(peft) == t5


def test_old_sd1_files_without_text_model_level():
    from loratools.keys.state_dict import plan_diffusers

    shapes = {"model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3),
              "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (32, 32, 3, 3),
              "model.diffusion_model.output_blocks.0.0.in_layers.2.weight": (32, 64, 3, 3),
              "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight": (37, 32)}
    t = BaseIndex.from_key_shapes(shapes).resolve("lora_te_text_model_encoder_layers_0_mlp_fc1")
    assert t.key == "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight"
    plans, _ = plan_diffusers(shapes)
    assert list(plans["text_encoder"]) == ["text_model.encoder.layers.0.mlp.fc1.weight"]


def test_alias_conflict_names_both_targets():
    # An old SD1 file carrying the same TE layer with and without `text_model.` is ambiguous.
    shapes = {
        "model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (32, 32, 3, 3),
        "model.diffusion_model.output_blocks.0.0.in_layers.2.weight": (32, 64, 3, 3),
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (37, 32),
        "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight": (37, 32),
    }
    with pytest.raises(InvalidFileError, match=r"text_model\.encoder.*and.*transformer\.encoder"):
        BaseIndex.from_key_shapes(shapes)


def test_shapes_compatible_rules():
    assert shapes_compatible((320, 320, 1, 1), (320, 320))  # SD1 conv proj_in vs SD2/SDXL linear
    assert shapes_compatible((320, 320), (320, 320, 1, 1))
    assert shapes_compatible((320, 2880), (320, 320, 3, 3))  # LoHa/LoKr flattened conv
    assert not shapes_compatible((640, 320), (320, 640))
    assert not shapes_compatible((320, 768), (320, 2048))


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_tiny_single_file_slices_equal_the_hf_weights(arch):
    """On real tensors: every target of a tiny single file (SD2/SDXL OpenCLIP slices included)
    holds exactly the diffusers model's weight, and the names we write resolve back to it."""
    import torch

    from loratools.keys.naming import kohya_name
    from loratools.keys.state_dict import align_text_model_level, to_single_file
    from loratools.tiny import build_pipeline
    from loratools.tiny.adapters import target_modules

    pipe = build_pipeline(arch)
    comps = {c: getattr(pipe, c).state_dict() for c in ("unet", "text_encoder", "text_encoder_2", "vae")
             if getattr(pipe, c, None) is not None}
    single = to_single_file(comps, arch)
    index = BaseIndex.from_key_shapes({k: tuple(v.shape) for k, v in single.items()})
    folder = BaseIndex.from_key_shapes({c: {k: tuple(v.shape) for k, v in sd.items()} for c, sd in comps.items()})
    assert index.arch.arch == folder.arch.arch == arch
    modules = target_modules(pipe, "locon")
    assert modules
    for component, path, layer in modules:
        name = kohya_name(component, path, arch, unet_table=index.unet_table)
        t = index.resolve(name)
        assert t is not None, name
        w = single[t.key] if t.rows is None else single[t.key][t.rows[0]:t.rows[1]]
        assert torch.equal(w.reshape(layer.weight.shape), layer.weight), name
        assert index.kohya_name(t) == name and index.resolve(index.peft_name(t)) == t
        ft = folder.resolve(name)
        sd = comps[ft.component] if component == "unet" else align_text_model_level(comps[ft.component], [ft.key])
        assert torch.equal(sd[ft.key], layer.weight), name
    assert {t.component for t in folder.targets()} == {c for c in comps if c != "vae"}

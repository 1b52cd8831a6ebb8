"""The loaders' own key rules (`keys.loaders`), one test per rule, each naming where the rule is
in the loader's source; at full scale on the fixtures' real key lists, and against diffusers
itself on the tiny pipelines.

Sources: ComfyUI comfy/lora.py, comfy/weight_adapter/*.py; AUTOMATIC1111 stable-diffusion-webui
extensions-builtin/Lora/networks.py and network_*.py; diffusers 0.42 (installed)
loaders/lora_pipeline.py, loaders/lora_conversion_utils.py, loaders/peft.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from loratools.adapters import describe_header
from loratools.keys.index import BaseIndex
from loratools.keys.loaders import check_loader
from loratools.ops.check_keys import file_modules

FIXTURES = Path(__file__).parent / "fixtures"
SD15 = "ckpt_sd15_single_file.json"
SDXL = "ckpt_sdxl_single_file.json"


def _fixture(name: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    data = json.loads((FIXTURES / name).read_text())
    return {k: tuple(v["shape"]) for k, v in data["tensors"].items()}, data.get("metadata") or {}


_INDEXES: dict[str, BaseIndex] = {}


def _index(ckpt: str) -> BaseIndex:
    if ckpt not in _INDEXES:
        _INDEXES[ckpt] = BaseIndex.from_key_shapes(_fixture(ckpt)[0])
    return _INDEXES[ckpt]


def _report(loader: str, shapes: dict, index: BaseIndex, metadata: dict | None = None):
    summary = describe_header(shapes, metadata)
    return check_loader(loader, list(shapes), file_modules(shapes, metadata or {}, summary), index)


def _rename(shapes: dict, old: str, new: str) -> dict:
    """The file with module `old` stored as `new` (its keys keep their suffixes)."""
    return {(new + k[len(old):] if k.startswith(old + ".") else k): v for k, v in shapes.items()}


KOHYA = [("lora_kohya_sd15_lora.json", SD15), ("lora_kohya_sd15_locon.json", SD15),
         ("lora_kohya_sdxl_lora.json", SDXL), ("lora_kohya_sdxl_locon.json", SDXL),
         ("lora_lycoris_sdxl_locon.json", SDXL), ("lora_lycoris_sdxl_locon_tucker.json", SDXL),
         ("lora_lycoris_sdxl_loha.json", SDXL), ("lora_lycoris_sdxl_lokr.json", SDXL)]


@pytest.mark.parametrize("lora,ckpt", KOHYA, ids=[k[0].removesuffix(".json") for k in KOHYA])
def test_every_kohya_and_lycoris_fixture_loads_fully_in_comfyui_and_a1111(lora, ckpt):
    # ComfyUI comfy/lora.py model_lora_keys_unet (`lora_unet_` + every `diffusion_model.` key's path)
    # and model_lora_keys_clip (`lora_te1_`/`lora_te2_`); A1111 networks.py load_network's
    # "lora_unet" -> "diffusion_model" and "lora_te1_text_model" fallbacks and the lora_te2_ rule of
    # convert_diffusers_name_to_compvis. Against the real checkpoint and without one alike.
    shapes, meta = _fixture(lora)
    for index in (_index(ckpt), BaseIndex.standard("sd1" if ckpt == SD15 else "sdxl")):
        for loader in ("comfyui", "a1111"):
            report = _report(loader, shapes, index, meta)
            assert report.ok and report.loaded == len(shapes), (loader, report.skipped[:3])


# -- ComfyUI ----------------------------------------------------------------------------------

def test_comfyui_maps_peft_unet_attention_only_in_the_processor_form():
    # comfy/lora.py model_lora_keys_unet: the `unet.` names of the diffusers map are built with
    # `.to_` -> `.processor.to_` (and `to_out.0` -> `to_out`), so plain PEFT attention keys are not
    # mapped: 1120 of the 1472 keys of a diffusers SDXL LoRA ("lora key not loaded")
    shapes, meta = _fixture("lora_peft_sdxl.json")
    report = _report("comfyui", shapes, _index(SDXL), meta)
    assert report.loaded == 352 and len(report.skipped) == 1120
    assert {s.reason for s in report.skipped} == {"form"}
    assert all(s.key.startswith("unet.") and ".attn" in s.key for s in report.skipped)
    legacy = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": (8, 640),
              "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": (640, 8)}
    assert _report("comfyui", legacy, _index(SDXL)).ok


def test_comfyui_maps_only_the_six_clip_linears_of_each_layer():
    # comfy/lora.py model_lora_keys_clip: LORA_CLIP_MAP (q, k, v, out_proj, fc1, fc2) of layers 0-31
    shapes = {"lora_te_text_model_final_layer_norm.w_norm": (768,), "lora_te_text_model_final_layer_norm.b_norm": (768,),
              "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 768),
              "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": (3072, 4)}
    report = _report("comfyui", shapes, _index(SD15))
    assert [(s.key, s.reason) for s in report.skipped] == [("lora_te_text_model_final_layer_norm.w_norm", "form"),
                                                           ("lora_te_text_model_final_layer_norm.b_norm", "form")]


def test_comfyui_reads_sdxl_clip_l_as_lora_te_too():
    # comfy/lora.py model_lora_keys_clip: clip_l gets `lora_te_` and `lora_te1_` names
    shapes = {"lora_te_text_model_encoder_layers_3_self_attn_q_proj.lora_down.weight": (4, 768),
              "lora_te_text_model_encoder_layers_3_self_attn_q_proj.lora_up.weight": (768, 4)}
    assert _report("comfyui", shapes, _index(SDXL)).ok
    assert not _report("a1111", shapes, _index(SDXL)).ok  # A1111 falls back for lora_te1_ only (below)


def test_comfyui_has_no_ia3_type():
    # comfy/weight_adapter/__init__.py `adapters`: LoRA, LoHa, LoKr, GLoRA, OFT, BOFT; comfy/lora.py
    # load_lora adds norm/diff/set only: IA3's `weight`/`on_input` are "lora key not loaded"
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    shapes = {f"{name}.weight": (768,), f"{name}.on_input": ()}
    report = _report("comfyui", shapes, _index(SD15))
    assert {s.reason for s in report.skipped} == {"type"} and len(report.skipped) == 2
    assert _report("a1111", shapes, _index(SD15)).ok  # A1111 network_ia3.py reads it


def test_comfyui_keeps_one_of_two_modules_for_one_weight():
    # comfy/lora.py load_lora: patch_dict is keyed by the model weight, filled in key-map order
    # (model_lora_keys_unet: LDM names first, diffusers names after): the later one wins, silently
    shapes, meta = _fixture("lora_kohya_sdxl_lora.json")
    sgm = "lora_unet_input_blocks_4_1_proj_in"
    extra = {"lora_unet_down_blocks_1_attentions_0_proj_in" + k[len(sgm):]: v for k, v in shapes.items()
             if k.startswith(sgm + ".")}
    report = _report("comfyui", {**shapes, **extra}, _index(SDXL), meta)
    assert sorted(s.key for s in report.skipped) == sorted(k for k in shapes if k.startswith(sgm + "."))
    assert {s.reason for s in report.skipped} == {"duplicate"}


# -- A1111 ------------------------------------------------------------------------------------

def test_a1111_splits_keys_at_the_first_dot():
    # networks.py load_network: `key_network.partition(".")` -> a PEFT/diffusers key's module is
    # "unet" / "text_encoder", which no conversion maps: every key of a PEFT file is skipped
    shapes, meta = _fixture("lora_peft_sdxl.json")
    report = _report("a1111", shapes, _index(SDXL), meta)
    assert report.loaded == 0 and {s.reason for s in report.skipped} == {"form"}


def test_a1111_has_no_rule_for_lycoris_names():
    # networks.py convert_diffusers_name_to_compvis and load_network's fallbacks know lora_unet /
    # lora_te / lora_te1 / lora_te2 / oft_unet only
    shapes, meta = _fixture("lora_kohya_sd15_lora.json")
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    report = _report("a1111", _rename(shapes, name, "lycoris_down_blocks_0_attentions_0_proj_in"), _index(SD15), meta)
    assert [s.key.partition(".")[0] for s in report.skipped] == ["lycoris_down_blocks_0_attentions_0_proj_in"] * 3
    assert _report("comfyui", _rename(shapes, name, "lycoris_down_blocks_0_attentions_0_proj_in"), _index(SD15),
                   meta).ok  # comfy/lora.py model_lora_keys_unet maps `lycoris_` + diffusers path


def test_a1111_converts_diffusers_names_with_sd1_block_arithmetic():
    # networks.py convert_diffusers_name_to_compvis: up_blocks_N_upsamplers -> output block 2+3N,
    # sub-index `2 if N > 0 else 1`: right for SD1 (first up level without attention), wrong for
    # SDXL, whose first up level has attention; the SGM name (kohya's SDXL spelling) loads
    index = _index(SDXL)
    name = "lora_unet_output_blocks_2_2_conv"
    shapes = {f"{name}.lora_down.weight": (16, 1280, 3, 3), f"{name}.lora_up.weight": (1280, 16, 1, 1),
              f"{name}.alpha": ()}
    assert _report("a1111", shapes, index).ok
    diffusers_named = _rename(shapes, name, "lora_unet_up_blocks_0_upsamplers_0_conv")
    report = _report("a1111", diffusers_named, index)
    assert len(report.skipped) == 3 and {s.reason for s in report.skipped} == {"form"}
    assert _report("comfyui", diffusers_named, index).ok
    sd1 = _rename(shapes, name, "lora_unet_up_blocks_0_upsamplers_0_conv")
    sd1 = {k: ((16, 1280, 3, 3) if k.endswith("down.weight") else (1280, 16, 1, 1) if k.endswith("up.weight") else ())
           for k in sd1}  # (by suffix: the module name itself holds "up")
    assert _report("a1111", sd1, _index(SD15)).ok


def test_a1111_reads_sdxl_text_encoder_1_only_as_lora_te1():
    # networks.py load_network: `lora_te_` converts to `transformer_text_model_...` (SD1's layer
    # names); SDXL's are `0_transformer_...`, reached only by the `lora_te1_text_model` fallback
    shapes, meta = _fixture("lora_kohya_sdxl_lora.json")
    te1 = {k: v for k, v in shapes.items() if k.startswith("lora_te1_")}
    as_te = {"lora_te_" + k[len("lora_te1_"):]: v for k, v in te1.items()}
    assert _report("a1111", te1, _index(SDXL)).ok
    report = _report("a1111", as_te, _index(SDXL))
    assert report.loaded == 0 and {s.reason for s in report.skipped} == {"form"}


def test_a1111_patches_openclip_attention_only_with_q_k_v_and_out():
    # networks.py network_apply_weights: a MultiheadAttention is changed only when the network
    # has the `_q_proj`, `_k_proj`, `_v_proj` and `_out_proj` modules of that layer
    shapes, meta = _fixture("lora_kohya_sdxl_lora.json")
    out = "lora_te2_text_model_encoder_layers_5_self_attn_out_proj"
    without = {k: v for k, v in shapes.items() if not k.startswith(out + ".")}
    report = _report("a1111", without, _index(SDXL), meta)
    assert sorted({s.key.partition(".")[0] for s in report.skipped}) == [
        f"lora_te2_text_model_encoder_layers_5_self_attn_{p}_proj" for p in "kqv"]
    assert _report("comfyui", without, _index(SDXL), meta).ok  # ComfyUI keeps q/k/v as separate weights


def test_a1111_stops_at_a_module_no_type_accepts():
    # networks.py load_network: "Could not find a module type ... that would accept those keys"
    # (AssertionError) ends the load of the whole file; network_full.py needs `diff`
    shapes, meta = _fixture("lora_kohya_sd15_lora.json")
    shapes["lora_unet_conv_in.diff_b"] = (320,)
    report = _report("a1111", shapes, _index(SD15), meta)
    assert report.refused and report.loaded == 0
    assert [s.reason for s in report.skipped if s.key == "lora_unet_conv_in.diff_b"] == ["type"]


# -- diffusers --------------------------------------------------------------------------------

def test_diffusers_drops_dora_scale():
    # lora_pipeline.py lora_state_dict: `dora_scale` keys are filtered out with a warning
    shapes, meta = _fixture("lora_kohya_sd15_lora.json")
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    shapes[f"{name}.dora_scale"] = (320, 1, 1, 1)
    report = _report("diffusers", shapes, _index(SD15), meta)
    assert [(s.key, s.reason) for s in report.skipped] == [(f"{name}.dora_scale", "type")]


def test_diffusers_refuses_kohya_files_with_other_than_lora_factors():
    # lora_conversion_utils.py _convert_non_diffusers_lora_to_diffusers: only lora_down, lora_up and
    # alpha are consumed; "The following keys have not been correctly renamed" for the rest
    for name in ("lora_lycoris_sdxl_loha.json", "lora_lycoris_sdxl_lokr.json", "lora_lycoris_sdxl_locon_tucker.json"):
        shapes, meta = _fixture(name)
        report = _report("diffusers", shapes, _index(SDXL), meta)
        assert report.refused and report.loaded == 0, name


def test_diffusers_sdxl_drops_sgm_names_in_a_mixed_file():
    # lora_conversion_utils.py _maybe_map_sgm_blocks_to_diffusers: "if state_dict contains both
    # patterns, remove sgm"
    shapes, meta = _fixture("lora_kohya_sdxl_lora.json")
    mixed = _rename(shapes, "lora_unet_input_blocks_4_1_proj_in", "lora_unet_down_blocks_1_attentions_0_proj_in")
    report = _report("diffusers", mixed, _index(SDXL), meta)
    sgm = [k for k in mixed if k.startswith(("lora_unet_input_blocks", "lora_unet_middle_block",
                                              "lora_unet_output_blocks"))]
    assert sorted(s.key for s in report.skipped) == sorted(sgm) and {s.reason for s in report.skipped} == {"form"}
    assert _report("diffusers", shapes, _index(SDXL), meta).ok  # all SGM: renumbered with the UNet's config


def test_diffusers_sd1_pipeline_does_not_renumber_sgm_names():
    # lora_pipeline.py StableDiffusionLoraLoaderMixin.load_lora_weights passes no unet_config, so
    # `lora_unet_input_blocks_1_1_...` becomes `down_blocks.1.1...`: no such module ("unexpected
    # keys"); when no UNet module is found at all PEFT raises (peft tuners_utils inject_adapter,
    # NoMatchingPeftModuleError) and the file does not load
    index = _index(SD15)
    shapes, meta = _fixture("lora_kohya_sd15_lora.json")
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    one = _rename(shapes, name, "lora_unet_" + index.info(index.resolve(name)).ldm_path.replace(".", "_"))
    report = _report("diffusers", one, index, meta)
    assert not report.refused and len(report.skipped) == 3 and {s.reason for s in report.skipped} == {"form"}
    every = dict(shapes)
    for module in {k.partition(".")[0] for k in shapes if k.startswith("lora_unet_")}:
        every = _rename(every, module, "lora_unet_" + index.info(index.resolve(module)).ldm_path.replace(".", "_"))
    assert _report("diffusers", every, index, meta).refused


def test_diffusers_needs_lora_in_every_key_of_a_non_kohya_file():
    # lora_pipeline.py load_lora_weights: "Invalid LoRA checkpoint. Make sure all LoRA param names
    # contain `'lora'` substring."
    shapes, meta = _fixture("lora_peft_sdxl.json")
    shapes["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.alpha"] = ()
    assert _report("diffusers", shapes, _index(SDXL), meta).refused


def test_diffusers_reads_only_its_component_prefixes_outside_kohya_files():
    # lora_pipeline.py load_lora_into_unet / load_lora_into_text_encoder keep keys starting with
    # `unet.` / `text_encoder.` / `text_encoder_2.`; a `lycoris_` file loads nothing
    shapes, meta = _fixture("lora_kohya_sd15_lora.json")
    lyco = {k.replace("lora_unet_", "lycoris_", 1): v for k, v in shapes.items()
            if k.startswith("lora_unet_") and not k.endswith(".alpha")}
    report = _report("diffusers", lyco, _index(SD15))
    assert report.loaded == 0 and not report.refused and {s.reason for s in report.skipped} == {"form"}


def test_diffusers_skips_modules_it_cannot_find_but_raises_when_it_finds_none():
    # peft.py load_lora_adapter -> peft inject_adapter: modules the model lacks are left out
    # ("unexpected keys" warning, peft_utils _maybe_warn_for_unhandled_keys); a component of which
    # no module is found raises NoMatchingPeftModuleError
    index = _index(SD15)
    shapes, meta = _fixture("lora_kohya_sd15_lora.json")
    te = {"lora_te_text_model_encoder_layers_40_mlp_fc1.lora_down.weight": (4, 768),
          "lora_te_text_model_encoder_layers_40_mlp_fc1.lora_up.weight": (3072, 4)}
    report = _report("diffusers", {**shapes, **te}, index, meta)
    assert not report.refused and sorted(s.key for s in report.skipped) == sorted(te)
    assert {s.reason for s in report.skipped} == {"weight"}
    unet = {"lora_unet_down_blocks_0_attentions_9_proj_in.lora_down.weight": (4, 320, 1, 1),
            "lora_unet_down_blocks_0_attentions_9_proj_in.lora_up.weight": (320, 4, 1, 1)}
    assert _report("diffusers", {**shapes, **unet}, index, meta).skipped[0].reason == "weight"
    assert _report("diffusers", unet, index).refused


# -- every loader ------------------------------------------------------------------------------

@pytest.mark.parametrize("loader", ["comfyui", "a1111", "diffusers"])
def test_unknown_prefix_and_shape_mismatch(loader):
    # comfy/lora.py load_lora "lora key not loaded"; A1111 load_network keys_failed_to_match;
    # diffusers: not all kohya -> non-kohya path, which reads no `lora_te3_` key. A delta that does
    # not fit its weight fails ComfyUI's reshape (weight_adapter/lora.py calculate_weight),
    # A1111's calc_updown and diffusers' load_state_dict
    shapes, meta = _fixture("lora_kohya_sd15_lora.json")
    te3 = {"lora_te3_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 768),
           "lora_te3_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": (3072, 4)}
    report = _report(loader, {**shapes, **te3}, _index(SD15), meta)
    assert {s.reason for s in report.skipped if s.key in te3} == {"prefix"}
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    bad = {**shapes, f"{name}.lora_down.weight": (32, 1024)}  # SD2's context width on SD1
    report = _report(loader, bad, _index(SD15), meta)
    assert "shape" in {s.reason for s in report.skipped}


# -- against diffusers itself ------------------------------------------------------------------

class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _diffusers_outcome(arch: str, tensors: dict, path: Path) -> tuple[str, np.ndarray | None]:
    """"raised", "nothing" (every component says it found no LoRA keys) or "loaded", and the image."""
    import diffusers.utils.logging as dlog

    from loratools.io.writer import save_tensors
    from loratools.tiny import build_pipeline, render

    save_tensors(path, tensors)
    pipe = build_pipeline(arch, seed=0)
    records = _Records()
    logger = dlog.get_logger("diffusers")
    logger.addHandler(records)
    try:
        pipe.load_lora_weights(str(path))
    except Exception:  # noqa: BLE001 - any failure to load is what is compared
        return "raised", None
    finally:
        logger.removeHandler(records)
    if sum("No LoRA keys associated" in m for m in records.messages) >= (3 if arch == "sdxl" else 2):
        return "nothing", None
    return "loaded", render(pipe)


def _verdict(arch: str, tensors: dict, base: BaseIndex) -> str:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    report = _report("diffusers", shapes, base)
    if report.refused:
        return "raised"
    return "nothing" if report.loaded == 0 else "loaded"


def _cases(arch: str, pipe) -> dict[str, dict]:
    from loratools.tiny import make_lora

    index = BaseIndex.from_modules(arch, pipe.unet, [t for t in (pipe.text_encoder, getattr(pipe, "text_encoder_2",
                                                                                             None)) if t is not None])
    locon = make_lora(pipe, arch, "locon", dtype=torch.float32, strength=0.5).tensors
    out = {"kohya-locon": locon, "loha": make_lora(pipe, arch, "loha", dtype=torch.float32).tensors,
           "peft": make_lora(pipe, arch, "lora", naming="peft", dtype=torch.float32).tensors}
    peft = dict(out["peft"])
    peft[next(iter(peft)).rsplit(".lora_", 1)[0] + ".alpha"] = torch.tensor(2.0)
    out["peft-with-alpha"] = peft
    out["lycoris-prefix"] = {k.replace("lora_unet_", "lycoris_", 1): v for k, v in locon.items()
                             if k.startswith("lora_unet_") and not k.endswith(".alpha")}
    unet = sorted({k.partition(".")[0] for k in locon if k.startswith("lora_unet_") and "attn1_to_q" in k})[0]
    info = index.info(index.resolve(unet))
    other = "lora_unet_" + (info.ldm_path if arch == "sd1" else info.path).replace(".", "_")
    out["one-module-respelled"] = {(other + k[len(unet):] if k.startswith(unet + ".") else k): v
                                   for k, v in locon.items()}
    return out


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_diffusers_rules_agree_with_diffusers(arch, tmp_path):
    """Each case's verdict (loads / loads nothing / raises) is what `load_lora_weights` does; for
    the file with one module respelled (SDXL: diffusers-style, so diffusers drops the SGM-named
    rest; SD1: SGM-style, which the SD1 pipeline does not renumber) the image is that of the file
    without the keys the rules say are skipped."""
    from loratools.tiny import build_pipeline

    pipe = build_pipeline(arch, seed=0)
    index = BaseIndex.from_modules(arch, pipe.unet, [t for t in (pipe.text_encoder, getattr(pipe, "text_encoder_2",
                                                                                             None)) if t is not None])
    cases = _cases(arch, pipe)
    seen = {}
    for name, tensors in cases.items():
        actual, image = _diffusers_outcome(arch, tensors, tmp_path / f"{name}.safetensors")
        assert _verdict(arch, tensors, index) == actual, name
        seen[name] = (actual, image)
    assert seen["kohya-locon"][0] == "loaded" and seen["loha"][0] == "raised"
    respelled = cases["one-module-respelled"]
    report = _report("diffusers", {k: tuple(v.shape) for k, v in respelled.items()}, index)
    assert report.skipped and len(report.skipped) < len(respelled)
    kept = {k: v for k, v in respelled.items() if k not in {s.key for s in report.skipped}}
    _, image = _diffusers_outcome(arch, kept, tmp_path / "kept.safetensors")
    assert np.abs(image - seen["one-module-respelled"][1]).max() < 1e-6

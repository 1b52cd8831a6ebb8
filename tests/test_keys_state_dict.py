"""Whole-state-dict conversion diffusers <-> single file, checked against diffusers' own
single-file converters and against the full-scale fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loratools.errors import UsageError
from loratools.keys.unet_blocks import UNetBlockTable
from loratools.keys.state_dict import (
    LazyStateDict, align_text_model_level, from_single_file, plan_diffusers, plan_single_file, to_single_file,
)

FIXTURES = Path(__file__).parent / "fixtures"
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason="fixtures folder not found")

FULL_SCALE = [("sd1", "ckpt_sd15_single_file.json", "diffusers_sd15.json"),
              ("sdxl", "ckpt_sdxl_single_file.json", "diffusers_sdxl.json")]


@needs_fixtures
@pytest.mark.parametrize("arch,single,folder", FULL_SCALE)
def test_full_scale_plans_reproduce_the_other_layout(arch, single, folder):
    ckpt = json.loads((FIXTURES / single).read_text())
    ckpt_shapes = {k: tuple(v["shape"]) for k, v in ckpt["tensors"].items()}
    comps = {f.split("/")[0]: {k: tuple(v["shape"]) for k, v in t.items()}
             for f, t in json.loads((FIXTURES / folder).read_text())["files"].items()}

    plan = plan_single_file(comps, arch)
    weights = {k: s for k, s in ckpt_shapes.items() if k not in ckpt["extra_keys"]}
    assert {k: s.shape for k, s in plan.items()} == weights

    plans, passthrough = plan_diffusers(ckpt_shapes)
    assert {c: {k: s.shape for k, s in p.items()} for c, p in plans.items()} == comps
    # Non-weight keys are kept aside, never dropped; bigG's logit_scale has no diffusers home.
    expected_rest = set(ckpt["extra_keys"]) | ({"conditioner.embedders.1.model.logit_scale"} if arch == "sdxl" else set())
    assert set(passthrough) == expected_rest


def _tiny_models(arch):
    from loratools.tiny import build_pipeline

    pipe = build_pipeline(arch)
    return {c: getattr(pipe, c) for c in ("unet", "vae", "text_encoder", "text_encoder_2")
            if getattr(pipe, c, None) is not None}


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def tiny(request):
    models = _tiny_models(request.param)
    sds = {c: m.state_dict() for c, m in models.items()}
    return request.param, models, sds, to_single_file(sds, request.param)


def _assert_same(got, want):
    import torch

    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].shape == v.shape and torch.equal(got[k], v), k


def test_diffusers_own_loaders_read_our_single_file(tiny):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    arch, models, sds, single = tiny
    _assert_same(convert_ldm_unet_checkpoint(single, dict(models["unet"].config)), sds["unet"])
    _assert_same(convert_ldm_vae_checkpoint(single, dict(models["vae"].config)), sds["vae"])
    te = sds["text_encoder"]
    if arch == "sd2":
        back = convert_open_clip_checkpoint(models["text_encoder"], single, prefix="cond_stage_model.model.")
    else:
        te1_prefix = "conditioner.embedders.0." if arch == "sdxl" else "cond_stage_model."
        back = convert_ldm_clip_checkpoint({k: v for k, v in single.items() if k.startswith(te1_prefix)})
    _assert_same(align_text_model_level(back, te), te)
    if arch == "sdxl":
        back2 = convert_open_clip_checkpoint(models["text_encoder_2"], single, prefix="conditioner.embedders.1.model.")
        _assert_same(back2, sds["text_encoder_2"])


def test_round_trip_through_our_own_split(tiny):
    arch, models, sds, single = tiny
    split = from_single_file(single)
    assert set(split.components) == set(sds)
    for comp, sd in sds.items():
        got = align_text_model_level(split.components[comp], sd) if comp.startswith("text") else split.components[comp]
        _assert_same(got, sd)
        models[comp].load_state_dict(got, strict=True)
    assert set(split.passthrough) == ({"cond_stage_model.model.logit_scale"} if arch == "sd2" else
                                      {"conditioner.embedders.1.model.logit_scale"} if arch == "sdxl" else set())


def test_layout_details(tiny):
    arch, models, sds, single = tiny
    vae_q = single["first_stage_model.encoder.mid.attn_1.q.weight"]
    assert vae_q.ndim == 4 and vae_q.shape[2:] == (1, 1)  # LDM VAE attention is a 1x1 conv
    if arch == "sdxl":
        te2 = sds["text_encoder_2"]
        p = "conditioner.embedders.1.model."
        fused = single[p + "transformer.resblocks.1.attn.in_proj_weight"]
        w = te2["text_model.encoder.layers.1.self_attn.q_proj.weight"].shape[0]
        for i, name in enumerate("qkv"):  # rows are q, k, v in that order
            assert (fused[i * w:(i + 1) * w] == te2[f"text_model.encoder.layers.1.self_attn.{name}_proj.weight"]).all()
        assert (single[p + "text_projection"] == te2["text_projection.weight"].T).all()
        assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight" in single
    if arch == "sd1":
        assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in single


def test_lazy_evaluation_reads_only_what_is_asked():
    import torch

    class Counting(dict):
        reads: list[str] = []

        def __getitem__(self, k):
            self.reads.append(k)
            return dict.__getitem__(self, k)

    src = Counting({"conv_norm_out.weight": torch.ones(4), "conv_norm_out.bias": torch.zeros(4),
                    "down_blocks.0.resnets.0.conv1.weight": torch.ones(4, 4, 3, 3)})
    plan = plan_single_file({"unet": {k: tuple(v.shape) for k, v in src.items()}}, "sd1",
                            unet_table=UNetBlockTable.standard("sd1"))
    lazy = LazyStateDict(plan, {"unet": src})
    assert lazy.shape("model.diffusion_model.out.0.weight") == (4,)
    assert Counting.reads == []
    assert torch.equal(lazy["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"], torch.ones(4, 4, 3, 3))
    assert Counting.reads == ["down_blocks.0.resnets.0.conv1.weight"]


def test_unknown_component_is_refused():
    with pytest.raises(UsageError, match="text_encoder_2"):
        plan_single_file({"text_encoder_2": {"text_projection.weight": (4, 4)}}, "sd1")

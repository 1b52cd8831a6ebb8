"""Base-model loading as seed-guide users start: an SD1 single-file checkpoint (the Russian guide's
SD1.5 .safetensors) and `--vae` from a single file or a diffusers folder, each weight compared
with the pipeline that wrote the file."""

from __future__ import annotations

import pytest
import torch

from trainer.config import resolve_config
from trainer.models import load_base_model

pytestmark = pytest.mark.slow


def _same(module, reference) -> None:
    got, want = module.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


@pytest.fixture(scope="module")
def other_vae(tmp_path_factory):
    """A second tiny SD1 pipeline (different seed) whose VAE is saved both ways."""
    from loratools.tiny import build_pipeline, save_diffusers, save_single_file

    pipe = build_pipeline("sd1", seed=3)
    tmp = tmp_path_factory.mktemp("other_vae")
    return pipe, save_single_file(pipe, tmp / "other.safetensors"), save_diffusers(pipe, tmp / "other")


def test_sd1_single_file_loads_every_weight(tiny_sd1, tiny_sd1_ckpt, tiny_sd1_dir):
    model = load_base_model(resolve_config(["--pretrained_model_name_or_path", str(tiny_sd1_ckpt),
                                            "--tokenizer_cache_dir", str(tiny_sd1_dir)]))
    assert (model.arch, model.v_parameterization) == ("sd1", False)
    _same(model.unet, tiny_sd1.unet)
    _same(model.text_encoders[0], tiny_sd1.text_encoder)
    _same(model.vae, tiny_sd1.vae)


@pytest.mark.parametrize("form", ["single_file", "diffusers_folder", "vae_subfolder"])
def test_vae_flag_replaces_the_vae(tiny_sd1, tiny_sd1_dir, other_vae, form):
    pipe, single, folder = other_vae
    vae = {"single_file": single, "diffusers_folder": folder, "vae_subfolder": folder / "vae"}[form]
    model = load_base_model(resolve_config(["--pretrained_model_name_or_path", str(tiny_sd1_dir), "--vae", str(vae)]))
    base = tiny_sd1.vae.state_dict()
    assert any(not torch.equal(v, base[k]) for k, v in pipe.vae.state_dict().items())  # a different VAE
    _same(model.vae, pipe.vae)
    _same(model.unet, tiny_sd1.unet)  # the rest stays the base model's


def test_sd2_single_file_with_sd_scripts_v_flags(tmp_path):
    """SD2 is told apart from SD1 by its OpenCLIP-shaped text encoder; v-prediction comes from
    `--v_parameterization` as in sd-scripts (a single file does not say)."""
    from loratools.tiny import build_pipeline, save_diffusers, save_single_file

    pipe = build_pipeline("sd2")
    ckpt = save_single_file(pipe, tmp_path / "sd2.safetensors")
    folder = save_diffusers(pipe, tmp_path / "sd2")
    base = ["--pretrained_model_name_or_path", str(ckpt), "--tokenizer_cache_dir", str(folder)]
    plain = load_base_model(resolve_config(base))
    assert (plain.arch, plain.v_parameterization) == ("sd2", False)
    v = load_base_model(resolve_config(base + ["--v2", "--v_parameterization"]))
    assert (v.arch, v.v_parameterization) == ("sd2", True)
    _same(v.unet, pipe.unet)
    _same(v.text_encoders[0], pipe.text_encoder)

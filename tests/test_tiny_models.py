"""The tiny pipelines and tokenizer: real diffusers/transformers objects that render real images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loratools.tiny import build_pipeline, make_tokenizer, render, tokenizer_vocab


def test_tokenizer_known_words_are_single_tokens_and_unknown_fall_back_to_letters():
    tok = make_tokenizer()
    vocab, _ = tokenizer_vocab()
    ids = tok("tinychar, red circle, xq").input_ids
    assert ids[0] == vocab["<|startoftext|>"] and ids[-1] == vocab["<|endoftext|>"]
    assert tok.convert_ids_to_tokens(ids[1:-1]) == ["tinychar</w>", ",</w>", "red</w>", "circle</w>", ",</w>",
                                                    "x", "q</w>"]
    padded = tok("cat", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(padded) == 77 and padded[-1] == vocab["<|endoftext|>"]


def test_second_sdxl_tokenizer_pads_with_id_zero():
    tok = make_tokenizer(pad_token="!")
    assert tok.pad_token_id == 0
    assert tok("cat", padding="max_length", max_length=77).input_ids[-1] == 0


@pytest.mark.parametrize("fixture", ["tiny_sd1", "tiny_sdxl"])
def test_pipeline_renders_finite_image_of_requested_size(fixture, request):
    pipe = request.getfixturevalue(fixture)
    image = render(pipe, "tinychar, red circle", seed=0, size=64)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    assert image.std() > 0.02  # not a flat image
    assert render(pipe, "tinychar, red circle", seed=0, size=32).shape == (32, 32, 3)


@pytest.mark.parametrize("fixture", ["tiny_sd1", "tiny_sdxl"])
def test_render_is_deterministic_and_depends_on_prompt_and_seed(fixture, request):
    pipe = request.getfixturevalue(fixture)
    a = render(pipe, "tinychar, red circle", seed=0)
    assert np.array_equal(a, render(pipe, "tinychar, red circle", seed=0))
    assert np.abs(a - render(pipe, "blue square", seed=0)).max() > 1e-3
    assert np.abs(a - render(pipe, "tinychar, red circle", seed=1)).max() > 1e-3


def test_same_seed_same_weights_other_seed_other_weights(tiny_sd1):
    again = build_pipeline("sd1", seed=0)
    other = build_pipeline("sd1", seed=1)
    w = tiny_sd1.unet.conv_in.weight
    assert torch.equal(w, again.unet.conv_in.weight)
    assert not torch.equal(w, other.unet.conv_in.weight)


def test_building_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_pipeline("sd1", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_shapes_follow_the_real_architectures(tiny_sd1, tiny_sdxl):
    for pipe in (tiny_sd1, tiny_sdxl):
        assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 8
        assert pipe.vae_scale_factor == 8
    assert tiny_sd1.unet.config.cross_attention_dim == tiny_sd1.text_encoder.config.hidden_size
    # SD1 attention projections are 1x1 convs, SDXL's are linear (as the real models).
    assert isinstance(tiny_sd1.unet.down_blocks[0].attentions[0].proj_in, torch.nn.Conv2d)
    assert isinstance(tiny_sdxl.unet.down_blocks[1].attentions[0].proj_in, torch.nn.Linear)
    te1, te2, unet = tiny_sdxl.text_encoder.config, tiny_sdxl.text_encoder_2.config, tiny_sdxl.unet.config
    assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert unet.projection_class_embeddings_input_dim == te2.projection_dim + 6 * unet.addition_time_embed_dim
    assert len(tiny_sdxl.unet.down_blocks[1].attentions[0].transformer_blocks) == 2
    assert type(tiny_sdxl.text_encoder_2).__name__ == "CLIPTextModelWithProjection"


def test_sd2_variant_renders():
    pipe = build_pipeline("sd2")
    assert pipe.text_encoder.config.hidden_act == "gelu" and pipe.unet.config.use_linear_projection
    assert np.isfinite(render(pipe, "tinychar", size=32)).all()

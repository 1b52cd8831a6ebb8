"""Tiny SD1-, SD2- and SDXL-like diffusers pipelines built from configs (no hub access).

The shapes keep every structural feature that LoRA tooling cares about (attention with
``proj_in``/``proj_out`` as conv (SD1) or linear (SD2, SDXL), resnets with shortcuts, down/up
samplers, a mid block, a VAE with a scale factor of 8, SDXL's two text encoders and its
``text_time`` embedding) at widths of 8-64, so a pipeline builds and renders in well under a
second on a CPU. Weights come from diffusers'/transformers' own initialisers under a fixed seed,
so the same seed gives bit-identical models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loratools.tiny.tokenizer import EOS, MAX_LENGTH, make_tokenizer, tokenizer_vocab

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

ARCHES = ("sd1", "sd2", "sdxl")

#: SD's training noise schedule; a 2-step Euler sampler on it is fast and deterministic.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
}

TEXT_HIDDEN = 32
#: SDXL's second encoder is wider than the first (1280 vs 768 in the real model). diffusers'
#: ``from_single_file`` tells the two apart by that width, so the tiny one must differ too.
TEXT_HIDDEN_2 = 48


def text_encoder_config(*, layers: int, act: str = "quick_gelu", pad_token_id: int | None = None,
                        hidden: int = TEXT_HIDDEN) -> dict[str, Any]:
    """Config kwargs of a tiny CLIP text encoder sharing the tiny tokenizer's vocabulary."""
    vocab, _ = tokenizer_vocab()
    return {
        "vocab_size": len(vocab),
        "hidden_size": hidden,
        "intermediate_size": hidden + 5,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_LENGTH,
        "projection_dim": hidden,
        "hidden_act": act,
        "bos_token_id": vocab["<|startoftext|>"],
        "eos_token_id": vocab[EOS],
        "pad_token_id": vocab[EOS] if pad_token_id is None else pad_token_id,
    }


def vae_config(scaling_factor: float) -> dict[str, Any]:
    """Four levels so the latent is image/8 like every real SD VAE."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (8, 8, 16, 16),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 64,
        "scaling_factor": scaling_factor,
    }


def unet_config(arch: str) -> dict[str, Any]:
    """UNet2DConditionModel kwargs for a tiny model of ``arch`` ("sd1", "sd2" or "sdxl")."""
    common: dict[str, Any] = {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "norm_num_groups": 32,
    }
    if arch == "sd1":
        return common | {
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": TEXT_HIDDEN,
            "attention_head_dim": 8,
        }
    if arch == "sd2":
        # SD2: linear proj_in/proj_out, per-level head counts, OpenCLIP-sized cross attention.
        return common | {
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": TEXT_HIDDEN,
            "attention_head_dim": (4, 8),
            "use_linear_projection": True,
            "upcast_attention": False,
        }
    if arch == "sdxl":
        time_dim = 8
        return common | {
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "cross_attention_dim": TEXT_HIDDEN + TEXT_HIDDEN_2,
            "transformer_layers_per_block": (1, 2),
            "attention_head_dim": (2, 4),
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": time_dim,
            "projection_class_embeddings_input_dim": TEXT_HIDDEN_2 + 6 * time_dim,
        }
    raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {ARCHES}")


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)


def build_pipeline(arch: str = "sd1", seed: int = 0) -> DiffusionPipeline:
    """Build a tiny pipeline of ``arch`` with seeded random weights, in float32 on the CPU.

    Args:
        arch: "sd1" (StableDiffusionPipeline, CLIP ViT-L-like TE with quick_gelu), "sd2"
            (StableDiffusionPipeline with an OpenCLIP-like gelu TE and linear projections) or
            "sdxl" (StableDiffusionXLPipeline, CLIPTextModel + CLIPTextModelWithProjection).
        seed: weights are a function of the seed only; the global torch RNG is left untouched.

    Returns:
        The pipeline, in eval mode, progress bar disabled.

    Example:
        >>> pipe = build_pipeline("sdxl", seed=1)
        >>> pipe.unet.config.cross_attention_dim  # 32 (TE1) + 48 (TE2)
        80
    """
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if arch not in ARCHES:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {ARCHES}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config(arch))
        if arch == "sdxl":
            vae = AutoencoderKL(**vae_config(0.13025))
            te1 = CLIPTextModel(CLIPTextConfig(**text_encoder_config(layers=3)))
            te2 = CLIPTextModelWithProjection(
                CLIPTextConfig(**text_encoder_config(layers=3, act="gelu", pad_token_id=0, hidden=TEXT_HIDDEN_2))
            )
            pipe = StableDiffusionXLPipeline(
                vae=vae,
                text_encoder=te1,
                text_encoder_2=te2,
                tokenizer=make_tokenizer(),
                tokenizer_2=make_tokenizer(pad_token="!"),
                unet=unet,
                scheduler=_scheduler(),
            )
        else:
            vae = AutoencoderKL(**vae_config(0.18215))
            act = "quick_gelu" if arch == "sd1" else "gelu"
            te = CLIPTextModel(CLIPTextConfig(**text_encoder_config(layers=3, act=act)))
            pipe = StableDiffusionPipeline(
                vae=vae,
                text_encoder=te,
                tokenizer=make_tokenizer(pad_token=EOS if arch == "sd1" else "!"),
                unet=unet,
                scheduler=_scheduler(),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe: DiffusionPipeline, prompt: str = "tinychar, red circle", seed: int = 0, steps: int = 2,
           size: int = 64, **kwargs: Any):
    """Render one image deterministically; returns a float numpy array (H, W, 3) in [0, 1].

    A CPU generator seeded with ``seed`` makes the initial latents, so two pipelines with the same
    weights give the same image to float rounding: the comparison tests of merges and conversions
    rest on this. Extra keyword arguments go to the pipeline call (e.g. ``guidance_scale``).
    """
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        out = pipe(prompt, num_inference_steps=steps, height=size, width=size, generator=generator,
                   output_type="np", **kwargs)
    return out.images[0]

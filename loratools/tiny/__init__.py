"""Tiny real Stable Diffusion models, adapters and data for tests and the demo (no hub access).

Everything is built from code and configs, deterministic for a given seed, float32 on the CPU.
Times measured on the 2-core dev machine, in a process that has already imported torch,
diffusers and transformers (that import alone takes ~3 s):

- ``make_tokenizer(pad_token)`` (tokenizer.py): a CLIP byte-level BPE tokenizer (742 ids) loaded
  with ``CLIPTokenizer`` from a vocab.json + merges.txt written by ``write_tokenizer_files``;
  common caption words (``tinychar``, ``red``, ``circle``...) are single tokens. ~10 ms.
- ``build_pipeline(arch, seed)`` (models.py): ``"sd1"`` / ``"sd2"`` ``StableDiffusionPipeline`` or
  ``"sdxl"`` ``StableDiffusionXLPipeline``; UNet block_out_channels (32, 64), CLIP text encoders
  of width 32 and 3 layers (SDXL: two, the second with projection), a 4-level VAE (scale factor
  8). ~40-50 ms each. ``unet_config``/``vae_config``/``text_encoder_config``/``SCHEDULER_CONFIG``
  expose the configs.
- ``render(pipe, prompt, seed, steps=2, size=64)`` (models.py): one deterministic image as a
  float (H, W, 3) numpy array in [0, 1]. ~35 ms (the first call in a process ~0.3-2 s warm-up).
- ``save_diffusers(pipe, dir)`` / ``load_diffusers(dir)`` (files.py): a diffusers folder. ~30 /
  ~90 ms.
- ``save_single_file(pipe, path, dtype)`` / ``load_single_file(path, arch)`` (files.py): one LDM
  (SD1/SD2) or SGM (SDXL) .safetensors through ``loratools.keys.state_dict`` and ``loratools.io``.
  ~30-40 / ~50-100 ms. diffusers' ``from_single_file(path, config=<diffusers folder>,
  local_files_only=True)`` loads them too (~0.1-0.17 s) and renders the identical image.
- ``make_dataset(dir, arch, n_images)`` (dataset.py): ``<dir>/5_tinychar/img_000.png`` + ``.txt``
  captions (trigger word first, comma-separated tags), shapes with a stripe pattern, six aspect
  ratios; options for uncaptioned and RGBA images. ~15 ms for 6 images.
- ``make_lora(pipe, arch, kind, rank, alpha, seed, naming)`` (adapters.py): a synthetic adapter
  (kinds lora, locon, loha, lokr, full, dora; kohya names with SGM UNet paths for SDXL,
  ``kohya_diffusers`` or ``peft`` names; optionally untrained last text-encoder layers) with
  ground-truth float32 deltas, optionally written to a file. ~20-45 ms. diffusers'
  ``load_lora_weights`` loads the lora/locon/peft files and matches a manual merge of the deltas
  to ~4e-6 (the first call in a process imports peft: several seconds).

SDXL's second text encoder is 48 wide (the first 32): diffusers' ``from_single_file`` tells the
two encoders apart by width, as the real 768/1280 do. Read every dimension from the configs.
Timings were taken on an idle machine; expect several times more while other jobs run.
"""

from loratools.tiny.adapters import KINDS, NAMINGS, Target, TinyAdapter, make_lora, target_modules
from loratools.tiny.dataset import TinyDataset, make_dataset
from loratools.tiny.files import load_diffusers, load_single_file, save_diffusers, save_single_file
from loratools.tiny.models import (
    ARCHES,
    SCHEDULER_CONFIG,
    build_pipeline,
    render,
    text_encoder_config,
    unet_config,
    vae_config,
)
from loratools.tiny.tokenizer import make_tokenizer, tokenizer_vocab, write_tokenizer_files

__all__ = [
    "ARCHES", "KINDS", "NAMINGS", "SCHEDULER_CONFIG", "Target", "TinyAdapter", "TinyDataset",
    "build_pipeline", "load_diffusers", "load_single_file", "make_dataset", "make_lora", "make_tokenizer",
    "render", "save_diffusers", "save_single_file", "target_modules", "text_encoder_config", "tokenizer_vocab", "unet_config",
    "vae_config", "write_tokenizer_files",
]

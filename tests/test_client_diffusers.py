"""A real client: diffusers' own ``load_lora_weights`` against this layer's deltas.

For every input format diffusers reads, on tiny SD1-like and SDXL-like pipelines (fp32, CPU):
the image from ``pipe.load_lora_weights(file)`` equals the image from the base weights plus the
deltas ``parse_adapter`` computes; and both ``convert`` outputs (kohya, PEFT) give diffusers that
same image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loratools.adapters import load_adapter
from loratools.io.writer import save_tensors
from loratools.keys.index import BaseIndex
from loratools.ops.convert import ConvertOptions, convert
from loratools.tiny import build_pipeline, make_lora, render

TOLERANCE = 5e-5  # images in [0, 1]; observed differences are ~1e-6


def _diffusers_format(tensors: dict) -> dict:
    """PEFT keys as diffusers' training scripts save them: `lora.down` (UNet), `lora_linear_layer` (TE)."""
    out = {}
    for k, v in tensors.items():
        inner = ".lora." if k.startswith("unet.") else ".lora_linear_layer."
        out[k.replace(".lora_A.weight", f"{inner}down.weight").replace(".lora_B.weight", f"{inner}up.weight")] = v
    return out


def _legacy_format(tensors: dict) -> dict:
    """UNet attention LoRA as the old attention processors named it: `attn1.processor.to_q_lora.down`."""
    out = {}
    for k, v in tensors.items():
        if not k.startswith("unet.") or ".attn" not in k:
            continue
        head, _, suffix = k.partition(".lora_")
        head = head.replace(".to_out.0", ".to_out")
        attn, _, proj = head.rpartition(".")
        out[f"{attn}.processor.{proj}_lora.{'down' if suffix.startswith('A') else 'up'}.weight"] = v
    return out


# id, arch, kind, make_lora naming, rewrite of the PEFT file (None: the file as made)
FORMATS = [
    ("sd1-kohya-locon", "sd1", "locon", "kohya", None),
    ("sd1-peft", "sd1", "lora", "peft", None),
    ("sd1-diffusers", "sd1", "lora", "peft", _diffusers_format),
    ("sd1-legacy-processor", "sd1", "lora", "peft", _legacy_format),
    ("sdxl-kohya-sgm-locon", "sdxl", "locon", "kohya", None),
    ("sdxl-kohya-diffusers-names", "sdxl", "lora", "kohya_diffusers", None),
    ("sdxl-peft-locon", "sdxl", "locon", "peft", None),
]


def _with_deltas(arch: str, path) -> object:
    """A fresh pipeline whose weights are the base plus this layer's delta of every module."""
    pipe = build_pipeline(arch, seed=0)
    adapter = load_adapter(path)
    assert adapter.unknown == {}
    index = _live_index(arch, pipe)
    with torch.no_grad():
        for name, module in adapter.modules.items():
            target = index.resolve(name)
            layer = getattr(pipe, target.component).get_submodule(target.key.removesuffix(".weight"))
            layer.weight += module.delta(layer.weight).reshape(layer.weight.shape)
    return pipe


def _live_index(arch: str, pipe) -> BaseIndex:
    tes = [te for te in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if te is not None]
    return BaseIndex.from_modules(arch, pipe.unet, tes)


@pytest.fixture(scope="module")
def base_images() -> dict[str, np.ndarray]:
    return {arch: render(build_pipeline(arch, seed=0)) for arch in ("sd1", "sdxl")}


def _loaded(arch: str, path) -> np.ndarray:
    pipe = build_pipeline(arch, seed=0)
    pipe.load_lora_weights(str(path))
    return render(pipe)


@pytest.mark.parametrize("case", FORMATS, ids=[c[0] for c in FORMATS])
def test_diffusers_image_equals_base_plus_deltas(case, base_images, tmp_path, request):
    _, arch, kind, naming, rewrite = case
    base_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    made = make_lora(build_pipeline(arch, seed=0), arch, kind, rank=4, alpha=2.0, naming=naming,
                     dtype=torch.float32, strength=0.5)
    src = tmp_path / "in.safetensors"
    tensors = made.tensors if rewrite is None else rewrite(made.tensors)
    save_tensors(src, tensors, made.metadata)

    expected = render(_with_deltas(arch, src))
    assert np.abs(expected - base_images[arch]).max() > 1e-2  # the adapter visibly changes the image
    diffs = {"input": float(np.abs(_loaded(arch, src) - expected).max())}

    for to in ("kohya", "peft"):
        out = tmp_path / f"out_{to}.safetensors"
        convert(ConvertOptions(src, out, to, base=base_dir))
        diffs[to] = float(np.abs(_loaded(arch, out) - expected).max())
    print(case[0], diffs)
    assert max(diffs.values()) < TOLERANCE, diffs


def _peft_metadata(tensors: dict, r: int, alpha: float) -> dict[str, str]:
    """diffusers' `lora_adapter_metadata`: each component's LoraConfig as `<component>.<field>` JSON,
    with an `alpha_pattern` entry that gives one UNet module its own alpha."""
    import json

    from peft import LoraConfig

    flat = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        # without `text_model.`: PEFT matches by suffix, and transformers 5's CLIPTextModel lacks that level
        modules = sorted({k[len(comp) + 1:].rsplit(".lora_", 1)[0].removeprefix("text_model.")
                          for k in tensors if k.startswith(comp + ".")})
        if not modules:
            continue
        pattern = {modules[0]: 3 * alpha} if comp == "unet" else {}
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=modules, alpha_pattern=pattern).to_dict()
        flat.update({f"{comp}.{k}": sorted(v) if isinstance(v, set) else v for k, v in config.items()})
    return {"format": "pt", "lora_adapter_metadata": json.dumps(flat, sort_keys=True)}


@pytest.mark.parametrize("arch", ["sdxl"])
def test_peft_alpha_from_adapter_metadata_matches_diffusers(arch, tmp_path, request):
    base_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    made = make_lora(build_pipeline(arch, seed=0), arch, "lora", rank=4, alpha=4.0, naming="peft",
                     dtype=torch.float32, strength=0.3)
    src = tmp_path / "in.safetensors"
    save_tensors(src, made.tensors, _peft_metadata(made.tensors, 4, 6.0))  # scale 1.5, one module 4.5
    scales = {m.scale for m in load_adapter(src).modules.values()}
    assert scales == {1.5, 4.5}
    expected = render(_with_deltas(arch, src))
    diffs = {"input": float(np.abs(_loaded(arch, src) - expected).max())}
    for to in ("kohya", "peft"):
        out = tmp_path / f"out_{to}.safetensors"
        convert(ConvertOptions(src, out, to, base=base_dir))
        diffs[to] = float(np.abs(_loaded(arch, out) - expected).max())
    assert max(diffs.values()) < TOLERANCE, diffs


def _sd1_sgm_names(tensors: dict, index: BaseIndex) -> dict:
    """SD1 UNet modules under SGM names (`lora_unet_input_blocks_1_1_...`), which diffusers'
    SD1 pipeline mis-maps (it passes no UNet config to its SGM renamer)."""
    out = {}
    for k, v in tensors.items():
        module, _, suffix = k.partition(".")
        info = index.info(index.resolve(module))
        if info.component == "unet":
            module = "lora_unet_" + info.ldm_path.replace(".", "_")
        out[f"{module}.{suffix}"] = v
    return out


def _lycoris_prefix(tensors: dict, index: BaseIndex) -> dict:
    """UNet modules as LyCORIS' own wrapper names them (`lycoris_<diffusers path>`)."""
    return {k.replace("lora_unet_", "lycoris_", 1): v for k, v in tensors.items() if k.startswith("lora_unet_")}


@pytest.mark.parametrize("rename", [_sd1_sgm_names, _lycoris_prefix], ids=["sd1-sgm-names", "lycoris-prefix"])
def test_convert_makes_files_diffusers_misreads_loadable(rename, tiny_sd1_dir, tmp_path):
    """diffusers 0.42 raises on both inputs (NoMatchingPeftModuleError / "Invalid LoRA checkpoint");
    after `convert --to kohya` it loads them and draws the image of base + deltas."""
    pipe = build_pipeline("sd1", seed=0)
    made = make_lora(pipe, "sd1", "locon", rank=4, alpha=2.0, naming="kohya", dtype=torch.float32, strength=0.5)
    src = tmp_path / "in.safetensors"
    save_tensors(src, rename(made.tensors, _live_index("sd1", pipe)), made.metadata)
    expected = render(_with_deltas("sd1", src))
    out = tmp_path / "out.safetensors"
    convert(ConvertOptions(src, out, "kohya", base=tiny_sd1_dir))
    assert np.abs(_loaded("sd1", out) - expected).max() < TOLERANCE

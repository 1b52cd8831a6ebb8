"""The vocabulary built from live models (the trainer's side): every weight-bearing layer is
named, the trainer's names and blocks come from it, `--base_weights` reads every naming, and what
the trainer writes loads in ComfyUI, A1111 and diffusers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loratools.io.writer import save_tensors
from loratools.keys.blocks import block_slot
from loratools.keys.index import BaseIndex
from loratools.ops.check_keys import CheckKeysOptions, check_keys
from loratools.tiny import build_pipeline, make_lora


def _tes(pipe) -> list:
    return [t for t in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if t is not None]


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_every_layer_of_the_live_models_is_indexed_and_named_like_its_checkpoint(arch, request):
    pipe = request.getfixturevalue(f"tiny_{arch}")
    ckpt = request.getfixturevalue(f"tiny_{arch}_ckpt")
    live = BaseIndex.from_modules(arch, pipe.unet, _tes(pipe))
    from loratools.io import open_model

    single = BaseIndex.from_model(open_model(ckpt))  # the same model, saved as an LDM/SGM single file
    models = {"unet": pipe.unet, **dict(zip(("text_encoder", "text_encoder_2"), _tes(pipe)))}
    count = 0
    for component, model in models.items():
        for path, module in model.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            target = live.find(component, path)
            assert target is not None and target.key == f"{path}.weight", (component, path)
            info = live.info(target)
            if path != "text_projection":  # OpenCLIP's projection is not indexed in single files (index.py)
                assert single.kohya_name(single.resolve(info.kohya_name)) == info.kohya_name
            assert info.block == (block_slot(info.kohya_name, arch) if component == "unet" else -1)
            count += 1
    assert count > 50


def test_lycoris_full_algorithm_removes_weights_and_is_still_named(tiny_sd1):
    # LyCORIS `full` deletes each wrapped layer's `weight` (modules/full.py apply_to); the names of
    # the network still come from the vocabulary (built from the layers' own sizes)
    from trainer.network.lycoris_net import LycorisAdapter

    pipe = build_pipeline("sd1", seed=0)
    net = LycorisAdapter("sd1", pipe.unet, [pipe.text_encoder], 4, 2, None, {"algo": "full", "preset": "attn-mlp"},
                         train_unet=True, train_text_encoder=True)
    names = {k.partition(".")[0] for k in net.kohya_state_dict()}
    assert names and all(n.startswith(("lora_unet_down_blocks", "lora_unet_mid_block", "lora_unet_up_blocks",
                                       "lora_unet_time_embedding_linear_", "lora_te_text_model_encoder_layers"))
                         for n in names)


def test_base_weights_read_peft_names_too(tiny_sdxl, tmp_path):
    # issue 13: a PEFT SDXL LoRA's canonical names are diffusers paths; --base_weights knew only
    # the SGM spelling and refused the file ("modules match nothing in the base model")
    from trainer.base_weights import merge_base_weights

    made = make_lora(tiny_sdxl, "sdxl", "lora", naming="peft", dtype=torch.float32, path=tmp_path / "peft.safetensors")
    pipe = build_pipeline("sdxl", seed=0)
    merged = merge_base_weights("sdxl", pipe.unet, _tes(pipe), [str(made.path)], [0.5])
    assert merged == len(made.targets)
    for name, target in made.targets.items():
        model = getattr(pipe, target.component)
        original = getattr(tiny_sdxl, target.component)
        path = target.module_path
        try:
            w, w0 = model.get_submodule(path).weight, original.get_submodule(path).weight
        except AttributeError:  # transformers 5 CLIPTextModel: no `text_model.` level
            path = path.removeprefix("text_model.")
            w, w0 = model.get_submodule(path).weight, original.get_submodule(path).weight
        torch.testing.assert_close(w, w0 + 0.5 * target.delta.reshape(w.shape), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("module,args", [("networks.lora", {"conv_dim": "4", "conv_alpha": "1"}),
                                         ("lycoris.kohya", {"algo": "locon", "preset": "full", "conv_dim": "4"})])
def test_trained_files_load_in_every_loader(module, args, tiny_sdxl, tiny_sdxl_ckpt, tmp_path):
    # what `loratools train` writes (kohya_state_dict through the vocabulary's names) maps every key
    # in ComfyUI, A1111 and diffusers (LoRA/LoCon: the types all three read)
    pipe = build_pipeline("sdxl", seed=0)
    if module == "networks.lora":
        from trainer.network.network import LoRANetwork, NetworkOptions

        net = LoRANetwork("sdxl", pipe.unet, _tes(pipe), NetworkOptions.from_args("sdxl", 4, 1, None, args))
    else:
        from trainer.network.lycoris_net import LycorisAdapter

        net = LycorisAdapter("sdxl", pipe.unet, _tes(pipe), 4, 1, None, args, train_unet=True,
                             train_text_encoder=True)
    path = tmp_path / "trained.safetensors"
    save_tensors(path, net.kohya_state_dict())
    report = check_keys(CheckKeysOptions(path, tiny_sdxl_ckpt, loaders=("all",)))
    assert report.ok, report.problems()
    assert report.applied == len(report.modules) > 0

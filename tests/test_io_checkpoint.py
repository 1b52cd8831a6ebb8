"""Pickle checkpoints only via weights_only loading; diffusers folders with variants, .bin, shards."""

from __future__ import annotations

import collections
import json

import pytest
import torch

from loratools.errors import InvalidFileError
from loratools.io import open_model, open_state_dict, save_tensors


def test_ckpt_wrapper_removed(tmp_path):
    sd = {"model.diffusion_model.w": torch.randn(2, 3), "cond.b": torch.ones(2)}
    p = tmp_path / "m.ckpt"
    torch.save({"state_dict": sd, "global_step": 100, "epoch": 3}, p)
    got = open_state_dict(p)
    assert set(got) == set(sd) and torch.equal(got["model.diffusion_model.w"], sd["model.diffusion_model.w"])
    p2 = tmp_path / "lora.pt"
    torch.save(collections.OrderedDict(sd), p2)
    assert set(open_state_dict(p2)) == set(sd)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_code_refused(tmp_path, capsys):
    p = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "payload": _Evil()}, p)
    with pytest.raises(InvalidFileError, match=r"refused: loading this checkpoint would run code from it "
                                               r"\(builtins\.print\); nothing was run") as exc:
        open_state_dict(p)
    assert "\n" not in str(exc.value) and str(p) in str(exc.value)
    assert "weights_only" not in str(exc.value)  # torch's advice to turn the safety off is not passed on
    assert "this must never run" not in capsys.readouterr().out


def test_plain_pickle_refused_without_torch_warnings(tmp_path):
    """A bare protocol-4 pickle (not torch.save): torch's UserWarning used to precede the one-line error."""
    import pickle
    import warnings

    p = tmp_path / "plain.pt"
    p.write_bytes(pickle.dumps(_Evil, protocol=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning escaping the loader fails the test
        with pytest.raises(InvalidFileError, match=r"would run code from it \([\w.]*_Evil\)") as exc:
            open_state_dict(p)
    assert "\n" not in str(exc.value) and str(p) in str(exc.value)


def test_bad_ckpt(tmp_path):
    p = tmp_path / "junk.pt"
    p.write_bytes(b"not a checkpoint at all")
    with pytest.raises(InvalidFileError, match="not a readable PyTorch checkpoint .*damaged"):
        open_state_dict(p)
    with pytest.raises(InvalidFileError, match="not found"):
        open_state_dict(tmp_path / "missing.ckpt")
    t = tmp_path / "tensor.pt"
    torch.save(torch.ones(2), t)
    with pytest.raises(InvalidFileError, match="not a state dict"):
        open_state_dict(t)


def test_single_file_model(tmp_path):
    p = tmp_path / "m.safetensors"
    save_tensors(p, {"a": torch.ones(2, 3, dtype=torch.float16)})
    m = open_model(p)
    assert m.layout == "single_file" and m.key_shapes("") == {"a": (2, 3)} and m.all_files() == [p]


def test_diffusers_folder(tmp_path):
    root = tmp_path / "pipe"
    (root / "unet").mkdir(parents=True)
    (root / "text_encoder").mkdir()
    (root / "text_encoder_2").mkdir()
    (root / "vae").mkdir()
    (root / "scheduler").mkdir()
    save_tensors(root / "unet" / "diffusion_pytorch_model.fp16.safetensors", {"conv_in.weight": torch.ones(4, 4, 3, 3)})
    torch.save({"encoder.w": torch.ones(5)}, root / "text_encoder" / "pytorch_model.bin")  # not a known stem
    torch.save({"encoder.w": torch.ones(5)}, root / "text_encoder" / "model.bin")
    save_tensors(root / "text_encoder_2" / "model-00001-of-00002.safetensors", {"a": torch.ones(1)})
    save_tensors(root / "text_encoder_2" / "model-00002-of-00002.safetensors", {"b": torch.ones(2)})
    (root / "text_encoder_2" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    save_tensors(root / "vae" / "diffusion_pytorch_model.safetensors", {"v": torch.ones(1)})
    save_tensors(root / "vae" / "diffusion_pytorch_model.fp16.safetensors", {"v16": torch.ones(1)})

    m = open_model(root)
    assert m.layout == "diffusers" and set(m.components) == {"unet", "text_encoder", "text_encoder_2", "vae"}
    assert m.key_shapes("unet") == {"conv_in.weight": (4, 4, 3, 3)}
    assert m.key_shapes("text_encoder") == {"encoder.w": (5,)}
    assert m.key_shapes("text_encoder_2") == {"a": (1,), "b": (2,)}
    assert torch.equal(m.components["text_encoder_2"]["b"], torch.ones(2))
    assert list(m.components["vae"]) == ["v"]  # plain file preferred
    assert list(open_model(root, variant="fp16").components["vae"]) == ["v16"]


def test_empty_folder(tmp_path):
    with pytest.raises(InvalidFileError, match="no diffusers weights"):
        open_model(tmp_path)
    with pytest.raises(InvalidFileError, match="not found"):
        open_model(tmp_path / "nope")
    with pytest.raises(InvalidFileError, match="directory"):
        open_state_dict(tmp_path)


def test_a_folder_names_the_adapter_inside(tmp_path):
    """diffusers/PEFT trainers write a folder; the error says which file to pass."""
    from loratools.io import read_header

    folder = tmp_path / "my_lora"
    folder.mkdir()
    with pytest.raises(InvalidFileError, match="pass a file, not a folder"):
        open_state_dict(folder)
    save_tensors(folder / "pytorch_lora_weights.safetensors", {"unet.a.lora_A.weight": torch.ones(2, 4)})
    for read in (open_state_dict, read_header):
        with pytest.raises(InvalidFileError, match="pass the file inside it") as exc:
            read(folder)
        assert str(folder / "pytorch_lora_weights.safetensors") in str(exc.value)

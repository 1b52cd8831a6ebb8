"""metadata show: decoding, architecture from keys, counts, rank/alpha, training record, header-only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loratools.io import save_tensors
from loratools.ops.metadata import dataset_folders, decode_metadata, decode_value, summarize, tag_counts

FIXTURES = Path(__file__).parent / "fixtures"


def rank1_file(path: Path, fixture: str, metadata: dict | None = None, alpha_for=lambda name: 1.0) -> Path:
    """The fixture's module names and weight shapes at rank 1 (small file, real architecture)."""
    fx = json.loads((FIXTURES / fixture).read_text())
    t = {}
    for key, info in fx["tensors"].items():
        shape = list(info["shape"])
        if key.endswith(("lora_down.weight", "lora_A.weight")):
            shape[0] = 1
        elif key.endswith(("lora_up.weight", "lora_B.weight")):
            shape[1] = 1
        elif key.endswith(".alpha"):
            t[key] = torch.tensor(alpha_for(key), dtype=torch.float16)
            continue
        t[key] = torch.full(shape, 0.01, dtype=torch.float16)
    save_tensors(path, t, fx["metadata"] if metadata is None else metadata)
    return path


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return rank1_file(tmp_path_factory.mktemp("show") / "sd15.safetensors", "lora_kohya_sd15_lora.json",
                      alpha_for=lambda k: 0.5 if "lora_te_" in k else 1.0)


def test_decode_value():
    assert decode_value("ss_flip_aug", "False") is False and decode_value("ss_cache_latents", "True") is True
    assert decode_value("ss_training_comment", "None") is None
    assert decode_value("ss_learning_rate", "1e-4") == 1e-4 and decode_value("ss_epoch", "8") == 8
    assert decode_value("ss_sd_model_hash", "12345678") == "12345678"  # hashes stay text
    assert decode_value("ss_network_args", '{"conv_dim": "8", "use_tucker": "False"}') == {"conv_dim": "8",
                                                                                          "use_tucker": False}
    assert decode_value("x", "{not json") == "{not json"
    assert decode_value("ss_resolution", "(512, 512)") == "(512, 512)"


def test_tags_and_folders_from_both_layouts():
    old = decode_metadata({"ss_tag_frequency": json.dumps({"10_a": {"x": 3, "y": 1}, "5_b": {"x": 2, " z": 9}}),
                           "ss_dataset_dirs": json.dumps({"10_a": {"n_repeats": 10, "img_count": 4}})})
    assert tag_counts(old).most_common() == [("z", 9), ("x", 5), ("y", 1)]
    assert [(d.folder, d.images, d.repeats) for d in dataset_folders(old)] == [("10_a", 4, 10)]
    new = decode_metadata({"ss_datasets": json.dumps([{"tag_frequency": {"d": {"hero": 7}},
                                                       "subsets": [{"image_dir": "d", "img_count": 7,
                                                                    "num_repeats": 3, "is_reg": False}]}])})
    assert tag_counts(new) == {"hero": 7}
    assert [(d.folder, d.images, d.repeats) for d in dataset_folders(new)] == [("d", 7, 3)]


def test_show_sd15(sd15):
    s = summarize(sd15, top_tags=3)
    assert s.arch == "sd1" and "768" in s.arch_source  # from the keys, not the metadata
    assert s.adapter_types == {"lora": 264} and s.module_counts == {"unet": 192, "te": 72}
    assert s.ranks == {"1": 264} and s.alphas == {"1": 192, "0.5": 72} and s.scales == {"1": 192, "0.5": 72}
    assert s.dtypes == {"F16": 792} and s.tensor_count == 792 and s.file_size == sd15.stat().st_size
    assert s.trigger_words == [("sks character", 40), ("1girl", 38), ("solo", 35)]
    assert [(d.folder, d.images, d.repeats) for d in s.datasets] == [("10_sks_character", 40, 10)]
    assert s.training["clip skip"] == 2 and s.training["network module"] == "networks.lora"
    assert s.training["shuffle caption"] is True and s.training["started"].endswith("UTC")
    assert s.base_model["name"] == "v1-5-pruned-emaonly.safetensors"
    assert s.modelspec["architecture"] == "stable-diffusion-v1/lora"
    doc = s.to_json()
    assert doc["metadata"]["raw"]["ss_clip_skip"] == "2" and doc["metadata"]["decoded"]["ss_clip_skip"] == 2
    assert "tensors" not in doc
    json.dumps(doc)
    listed = {t["name"]: t for t in s.to_json(keys=True)["tensors"]}
    assert len(listed) == 792
    assert listed["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] == {
        "name": "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", "dtype": "F16", "shape": [1, 768]}


def test_show_sdxl_and_contradiction(tmp_path):
    p = rank1_file(tmp_path / "xl.safetensors", "lora_kohya_sdxl_lora.json")
    s = summarize(p)
    assert s.arch == "sdxl" and s.module_counts == {"unet": 722, "te2": 192, "te1": 72}
    lie = rank1_file(tmp_path / "lie.safetensors", "lora_kohya_sd15_lora.json",
                     metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    s = summarize(lie)
    assert s.arch is None and "SDXL" in s.arch_note and "SD1" in s.arch_note


def test_show_peft_and_no_metadata(tmp_path):
    s = summarize(rank1_file(tmp_path / "peft.safetensors", "lora_peft_sdxl.json"))
    assert s.naming == "peft" and s.adapter_types == {"lora": 736} and s.arch == "sdxl"
    save_tensors(tmp_path / "bare.safetensors", {"w": torch.zeros(2)})
    bare = summarize(tmp_path / "bare.safetensors")
    assert bare.raw == {} and bare.adapter_types == {} and bare.unknown_keys == 1


def test_show_reads_only_header_without_torch(sd15):
    # bytes read by the process (/proc/self/io rchar) while summarising, modules already imported
    code = ("import sys\n"
            "import loratools.adapters, loratools.keys.arch\n"
            "from loratools.ops.metadata import summarize\n"
            "def rchar():\n"
            "    return int(open('/proc/self/io').read().split('rchar: ')[1].split()[0])\n"
            "before = rchar()\n"
            "s = summarize(sys.argv[1])\n"
            "read = rchar() - before\n"
            "assert s.ranks == {'1': 264}, s.ranks\n"
            "print('torch' in sys.modules, read, s.header_size)\n")
    out = subprocess.run([sys.executable, "-c", code, str(sd15)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    has_torch, read, header = out.stdout.split()
    assert has_torch == "False"
    # the header, one 2-byte alpha per module (264), /proc/self/io itself and lazily imported
    # modules: tens of KiB, not the weights
    assert int(read) < int(header) + 64 * 1024
    assert sd15.stat().st_size - int(header) > 1_000_000


def test_a1111_scale_tensor_sets_the_scale(tmp_path):
    """`<module>.scale` overrides alpha / rank (read as a scalar, like the alphas) and is no unknown key."""
    d, u = torch.ones(4, 8), torch.ones(8, 4)
    t = {f"lora_unet_{m}.{s}": v for m in ("a", "b") for s, v in
         (("lora_down.weight", d), ("lora_up.weight", u), ("alpha", torch.tensor(2.0)))}
    t["lora_unet_a.scale"] = torch.tensor(1.5, dtype=torch.float16)
    save_tensors(tmp_path / "s.safetensors", t)
    s = summarize(tmp_path / "s.safetensors")
    assert s.unknown_keys == 0 and s.alphas == {"2": 2} and s.scales == {"1.5": 1, "0.5": 1}


def test_checkpoint_is_called_a_checkpoint(tiny_sd1_ckpt, tmp_path):
    """Was: 'unknown keys 440' for a base model, as if it were a broken adapter."""
    s = summarize(tiny_sd1_ckpt)
    assert s.kind == "checkpoint" and s.arch == "sd1" and s.to_json()["kind"] == "checkpoint"
    t = {"lora_unet_a.lora_down.weight": torch.ones(2, 4), "lora_unet_a.lora_up.weight": torch.ones(3, 2)}
    save_tensors(tmp_path / "a.safetensors", t)
    assert summarize(tmp_path / "a.safetensors").kind == "adapter"
    save_tensors(tmp_path / "x.safetensors", {"something": torch.ones(2)})
    assert summarize(tmp_path / "x.safetensors").kind == "unknown"

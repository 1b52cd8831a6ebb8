"""Block-weight merges (issue 16, item 2): sd-scripts' --lbws lists and named presets.

The slot of every module is checked against sd-scripts' own numbering (svd_merge_lora's
get_lbw_block_index, written out by hand below); a merge with block weights is checked against
plain merges at the scaled ratios: a block at 0 leaves its base weights byte-identical, a block at w
gives exactly the bytes a merge at ratio * w gives, in a checkpoint and with --to-lora.
"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from loratools.cli.app import app
from loratools.errors import UsageError
from loratools.io import open_safetensors
from loratools.keys.blocks import LBW_BLOCK_IDS, LBW_LAYOUTS, lbw_slot
from loratools.keys.index import BaseIndex
from loratools.ops.merge import LoraMergeOptions, MergeOptions, WeightedPath, merge_checkpoint, merge_loras
from loratools.ops.merge.blocks import parse_block_weights, presets
from loratools.ops.merge.ratios import resolve_inputs
from loratools.tiny import make_lora


@pytest.mark.parametrize(("name", "arch", "block"), [
    # SD1 (sd-scripts: down 1 + 3i + j + 1, downsampler 1 + 3(i + 1), mid 13, up 14 + 3i + j, upsampler 14 + 3i + 2)
    ("lora_te_text_model_encoder_layers_0_mlp_fc1", "sd1", "BASE"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in", "sd1", "IN01"),
    ("lora_unet_down_blocks_0_downsamplers_0_conv", "sd1", "IN03"),
    ("lora_unet_down_blocks_2_resnets_1_conv1", "sd1", "IN08"),
    ("lora_unet_mid_block_attentions_0_proj_out", "sd1", "MID"),
    ("lora_unet_up_blocks_0_resnets_2_conv2", "sd1", "OUT02"),
    ("lora_unet_up_blocks_2_upsamplers_0_conv", "sd1", "OUT08"),
    ("lora_unet_up_blocks_3_attentions_2_proj_in", "sd1", "OUT11"),
    # SDXL (sd-scripts: embeddings 1, input_blocks_n 1 + n, middle 13, output_blocks_n 14 + n, out 23)
    ("lora_te2_text_model_encoder_layers_3_self_attn_q_proj", "sdxl", "BASE"),
    ("lora_unet_time_embed_0", "sdxl", "IN00"),
    ("lora_unet_input_blocks_4_1_proj_in", "sdxl", "IN04"),
    ("lora_unet_input_blocks_8_0_in_layers_2", "sdxl", "IN08"),
    ("lora_unet_middle_block_2_out_layers_3", "sdxl", "MID"),
    ("lora_unet_output_blocks_0_1_proj_in", "sdxl", "OUT00"),
    ("lora_unet_output_blocks_8_0_skip_connection", "sdxl", "OUT08"),
    ("lora_unet_out_2", "sdxl", "OUT09"),
])
def test_lbw_slot_is_sd_scripts_numbering(name, arch, block):
    assert LBW_BLOCK_IDS[lbw_slot(name, arch)] == block


def test_layouts_and_outside_modules():
    assert {n: len(ids) for n, ids in LBW_LAYOUTS.items()} == {12: 12, 17: 17, 20: 20, 26: 26}
    assert all(set(ids) <= set(LBW_BLOCK_IDS) for ids in LBW_LAYOUTS.values())
    assert lbw_slot("lora_unet_conv_in", "sd1") == -1 and lbw_slot("lora_unet_time_embedding_linear_1", "sd1") == -1


def test_presets_are_data_and_fit_their_layouts():
    names = set(presets())
    assert {"ALL", "NONE", "INS", "IND", "INALL", "MIDD", "OUTD", "OUTS", "OUTALL", "ALL0.5"} <= names
    outd = parse_block_weights("outd", "sd1", origin="x")
    assert outd.named == LBW_LAYOUTS[17]
    on = {LBW_BLOCK_IDS[i] for i, w in enumerate(outd.weights) if w == 1.0}
    # the 17-weight list names OUT03-OUT06 on, the rest of its blocks off; unnamed slots stay 1
    assert {"BASE", "OUT03", "OUT04", "OUT05", "OUT06"} <= on and not on & {"IN01", "MID", "OUT07", "OUT11"}
    assert {"IN00", "IN03", "OUT00"} <= on
    sdxl = parse_block_weights("OUTALL", "sdxl", origin="x")
    assert sdxl.named == LBW_LAYOUTS[12] and sdxl.factor("lora_unet_input_blocks_4_1_proj_in", "sdxl") == 0.0


@pytest.mark.parametrize(("text", "arch", "words"), [
    ("[1,1]", "sd1", ["2 block weights", "17 or 26"]),
    ("1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0", "sdxl", ["17 block weights", "SD1", "12 or 20 or 26"]),
    ("OUTD", "sdxl", ["no SDXL version", "OUTALL"]),
    ("[1, \"a\"]", "sd1", ["finite numbers"]),
    ("NOPE", "sd1", ["unknown block-weight preset"]),
])
def test_bad_block_weights_are_refused(text, arch, words):
    with pytest.raises(UsageError) as err:
        parse_block_weights(text, arch, origin="style.safetensors")
    assert "style.safetensors" in str(err.value) and all(w in str(err.value) for w in words)


def test_inline_and_lbws_option():
    got = resolve_inputs(["a.safetensors:0.8:OUTD", "b.safetensors:0.5"], None, None)
    assert [(w.ratio, w.blocks) for w in got] == [(0.8, "OUTD"), (0.5, None)]
    got = resolve_inputs(["a.safetensors", "b.safetensors"], ["0.7,0.3"], ["[1,0]"])
    assert [(w.ratio, w.blocks) for w in got] == [(0.7, "[1,0]"), (0.3, None)]  # sd-scripts: the first ones
    with pytest.raises(UsageError):
        resolve_inputs(["a.safetensors:1:OUTD"], None, ["[1]"])
    with pytest.raises(UsageError):
        resolve_inputs(["a.safetensors"], None, ["[1]", "[1]"])


@pytest.fixture(scope="module")
def sd1(tiny_sd1, tiny_sd1_ckpt, tmp_path_factory):
    folder = tmp_path_factory.mktemp("blocks")
    locon = make_lora(tiny_sd1, "sd1", "locon", rank=4, alpha=2.0, seed=3, dtype=torch.float32,
                      path=folder / "locon.safetensors")
    return tiny_sd1_ckpt, locon


#: 26 weights: each block of the tiny SD1 UNet gets 0, 0.5 or 1 (BASE 0.5).
_W26 = [0.5, 1, 0, 0.5, 1, 0.5, 0, 1, 1, 1, 1, 1, 1, 0, 0.5, 1, 0, 0.5, 1, 0.5, 0, 1, 1, 1, 1, 1]


def test_checkpoint_merge_with_block_weights_equals_scaled_merges(sd1, tmp_path):
    base, locon = sd1
    ratio = 0.8
    lbw = "[" + ",".join(str(w) for w in _W26) + "]"
    merged = merge_checkpoint(MergeOptions(base, [WeightedPath(locon.path, ratio, lbw)], tmp_path / "b.safetensors"))
    plain = {w: tmp_path / f"r{w}.safetensors" for w in (0.5, 1.0)}
    for w, path in plain.items():
        merge_checkpoint(MergeOptions(base, [WeightedPath(locon.path, ratio * w)], path))
    index = BaseIndex.from_key_shapes(open_safetensors(base).key_shapes())
    before, after = open_safetensors(base), open_safetensors(tmp_path / "b.safetensors")
    weights = {w: open_safetensors(p) for w, p in plain.items()}
    seen = set()
    for name in locon.targets:
        target = index.resolve(name)
        w = _W26[lbw_slot(index.info(target).kohya_name, "sd1")]
        seen.add(w)
        want = before[target.key] if w == 0 else weights[w][target.key]
        assert after[target.key].dtype == want.dtype and torch.equal(after[target.key], want), (name, w)
    assert seen == {0, 0.5, 1.0}
    report = merged.adapters[0]
    zero = sum(1 for n in locon.targets if _W26[lbw_slot(index.info(index.resolve(n)).kohya_name, "sd1")] == 0)
    assert report.zeroed == zero and report.applied == len(locon.targets) and report.unnamed == 0


def test_to_lora_with_block_weights_equals_scaled_inputs(sd1, tmp_path):
    _, locon = sd1
    lbw = "[" + ",".join(str(w) for w in _W26) + "]"
    merge_loras(LoraMergeOptions([WeightedPath(locon.path, 0.8, lbw)], tmp_path / "b.safetensors"))
    for w in (0.5, 1.0):
        merge_loras(LoraMergeOptions([WeightedPath(locon.path, 0.8 * w)], tmp_path / f"r{w}.safetensors"))
    got = open_safetensors(tmp_path / "b.safetensors")
    scaled = {w: open_safetensors(tmp_path / f"r{w}.safetensors") for w in (0.5, 1.0)}
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in scaled[1.0]}
    for name in names:
        w = _W26[lbw_slot(name, "sd1")] if lbw_slot(name, "sd1") >= 0 else 1.0
        keys = [k for k in scaled[1.0] if k.startswith(name + ".")]
        if w == 0:
            assert not any(k in got for k in keys), name  # a block at 0 leaves the module out
            continue
        for k in keys:
            assert torch.equal(got[k], scaled[w][k]), k


def test_sdxl_short_list_keeps_unnamed_blocks(tiny_sdxl, tiny_sdxl_ckpt, tmp_path):
    locon = make_lora(tiny_sdxl, "sdxl", "locon", rank=2, seed=5, dtype=torch.float32, path=tmp_path / "x.safetensors")
    result = merge_checkpoint(MergeOptions(tiny_sdxl_ckpt, [WeightedPath(locon.path, 1.0, "NONE")],
                                           tmp_path / "none.safetensors"))
    report = result.adapters[0]
    # NONE's 12 weights name the attention blocks and BASE; resnets elsewhere keep weight 1 (sd-scripts)
    assert report.zeroed > 0 and report.unnamed > 0 and report.zeroed + report.unnamed == report.applied
    assert result.patched_keys > 0


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_inline_preset_equals_lbws_and_refuses_bad_lists(sd1, tmp_path):
    base, locon = sd1
    outd17 = "[1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0]"
    r = invoke("merge", base, f"{locon.path}:0.8:OUTD", "-o", tmp_path / "a.safetensors")
    assert r.exit_code == 0, r.output
    assert "blocks OUTD" in r.stdout and "at weight 0" in r.stdout
    r = invoke("merge", "--sd_model", base, "--models", locon.path, "--ratios", 0.8, "--lbws", outd17,
               "--save_to", tmp_path / "b.safetensors")
    assert r.exit_code == 0, r.output
    a, b = open_safetensors(tmp_path / "a.safetensors"), open_safetensors(tmp_path / "b.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    r = invoke("merge", base, locon.path, "--lbws", "[1,1]", "-o", tmp_path / "c.safetensors")
    assert isinstance(r.exception, UsageError) and "block weights do not fit SD1" in str(r.exception)
    assert not (tmp_path / "c.safetensors").exists()


def test_to_lora_block_weights_need_an_architecture(sd1, tmp_path):
    """A tiny LoRA without metadata tells no architecture: block weights then need --base."""
    from loratools.io import save_tensors

    base, locon = sd1
    bare = save_tensors(tmp_path / "bare.safetensors", dict(open_safetensors(locon.path))).path
    with pytest.raises(UsageError, match="--base"):
        merge_loras(LoraMergeOptions([WeightedPath(bare, 1.0, "OUTD")], tmp_path / "a.safetensors"))
    merge_loras(LoraMergeOptions([WeightedPath(bare, 1.0, "OUTD")], tmp_path / "b.safetensors", base=base))
    merge_loras(LoraMergeOptions([WeightedPath(locon.path, 1.0, "OUTD")], tmp_path / "c.safetensors", base=base))
    b, c = open_safetensors(tmp_path / "b.safetensors"), open_safetensors(tmp_path / "c.safetensors")
    assert set(b) == set(c) and all(torch.equal(b[k], c[k]) for k in b)

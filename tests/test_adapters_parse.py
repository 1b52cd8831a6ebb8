"""Parsing: every fixture at full scale, every naming family, unknown keys, header-only summaries."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from loratools.adapters import describe_header, parse_adapter
from loratools.adapters.base import AdapterModule
from loratools.errors import InvalidFileError


FIXTURES = Path(__file__).parent / "fixtures"
LORA_FIXTURES = sorted(FIXTURES.glob("lora_*.json"))
_DTYPES = {"F16": torch.float16, "F32": torch.float32, "BF16": torch.bfloat16, "I64": torch.int64}
# fixture README count names -> canonical name prefix
_COUNT_PREFIX = {"lora_unet_": "lora_unet_", "unet": "lora_unet_", "lora_te_": "lora_te_",
                 "lora_te1_": "lora_te1_", "text_encoder": "lora_te1_", "lora_te2_": "lora_te2_",
                 "text_encoder_2": "lora_te2_"}


def _meta_state_dict(fixture: dict) -> dict[str, torch.Tensor]:
    """Factors as meta tensors (no memory); alphas real, since their value is read."""
    out = {}
    for k, v in fixture["tensors"].items():
        if k.endswith(".alpha"):
            out[k] = torch.tensor(4.0, dtype=_DTYPES[v["dtype"]])
        else:
            out[k] = torch.empty(v["shape"], dtype=_DTYPES[v["dtype"]], device="meta")
    return out


@pytest.mark.parametrize("path", LORA_FIXTURES, ids=[p.stem for p in LORA_FIXTURES])
def test_fixture_parses_completely(path):
    fixture = json.loads(path.read_text())
    parsed = parse_adapter(_meta_state_dict(fixture), fixture.get("metadata"))
    counts = fixture["module_counts"]
    assert parsed.unknown == {}
    assert len(parsed.modules) == counts["total_modules"]
    for key, prefix in _COUNT_PREFIX.items():
        if key in counts:
            assert sum(n.startswith(prefix) for n in parsed.modules) == counts[key], key
    for name, m in parsed.modules.items():
        assert "." not in name and name == m.name
        if name.startswith("lora_te"):
            assert "_text_model_encoder_layers_" in name
    header = describe_header({k: v["shape"] for k, v in fixture["tensors"].items()}, fixture.get("metadata"))
    assert header.unknown == [] and header.naming == parsed.naming
    assert {n: (s.kind, s.rank) for n, s in header.modules.items()} == \
        {n: (m.kind, m.rank) for n, m in parsed.modules.items()}
    for n, s in header.modules.items():
        m = parsed.modules[n]
        if m.kind != "ia3":
            assert s.weight_shape == m.weight_shape


def test_fixture_kinds_and_shapes():
    kinds = {}
    for path in LORA_FIXTURES:
        fixture = json.loads(path.read_text())
        parsed = parse_adapter(_meta_state_dict(fixture), fixture.get("metadata"))
        kinds[path.stem] = parsed.naming, Counter(m.kind for m in parsed.modules.values())
    assert kinds["lora_lycoris_sdxl_loha"][1] == {"loha": 1052}
    assert kinds["lora_lycoris_sdxl_lokr"][1] == {"lokr": 1052}
    assert kinds["lora_peft_sdxl"][0] == "peft"
    assert kinds["lora_diffusers_sdxl_trainscript"][0] == "diffusers"
    tucker = parse_adapter(_meta_state_dict(json.loads((FIXTURES / "lora_lycoris_sdxl_locon_tucker.json").read_text())))
    conv = tucker.modules["lora_unet_input_blocks_4_0_in_layers_2"]
    assert conv.mid is not None and conv.weight_shape == (640, 320, 3, 3)


def test_peft_fixture_alpha_from_adapter_metadata():
    fixture = json.loads((FIXTURES / "lora_peft_sdxl.json").read_text())
    md = dict(fixture["metadata"])
    config = json.loads(md["lora_adapter_metadata"])
    config["unet.lora_alpha"] = 4
    config["text_encoder_2.alpha_pattern"] = {"text_model.encoder.layers.3.self_attn.q_proj": 16}
    md["lora_adapter_metadata"] = json.dumps(config)
    parsed = parse_adapter(_meta_state_dict(fixture), md)
    unet = parsed.modules["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert (unet.alpha, unet.rank, unet.scale) == (4.0, 8, 0.5)
    te2 = parsed.modules["lora_te2_text_model_encoder_layers_3_self_attn_q_proj"]
    assert te2.scale == 2.0
    assert parsed.modules["lora_te2_text_model_encoder_layers_13_self_attn_q_proj"].scale == 1.0
    assert parsed.modules["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"].scale == 1.0
    summary = describe_header({k: v["shape"] for k, v in fixture["tensors"].items()}, md)
    assert summary.modules[unet.name].alpha == 4.0 and summary.modules[unet.name].alpha_key is None


D, U = torch.zeros(2, 4), torch.zeros(3, 2)
_SDXL_MARK = {"text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": D,
              "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_B.weight": U}

# id, {key: tensor}, canonical name expected, naming expected
NAMING_CASES = [
    ("kohya", {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": D,
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": U},
     "lora_unet_input_blocks_4_1_proj_in", "kohya"),
    ("kohya-te-transformers5", {"lora_te_encoder_layers_0_self_attn_q_proj.lora_down.weight": D,
                                "lora_te_encoder_layers_0_self_attn_q_proj.lora_up.weight": U},
     "lora_te_text_model_encoder_layers_0_self_attn_q_proj", "kohya"),
    ("lycoris-prefix", {"lycoris_down_blocks_0_resnets_0_conv1.hada_w1_a": U, "lycoris_down_blocks_0_resnets_0_conv1.hada_w1_b": D,
                        "lycoris_down_blocks_0_resnets_0_conv1.hada_w2_a": U, "lycoris_down_blocks_0_resnets_0_conv1.hada_w2_b": D},
     "lora_unet_down_blocks_0_resnets_0_conv1", "lycoris"),
    ("peft-unet", {"unet.mid_block.attentions.0.proj_in.lora_A.weight": D, "unet.mid_block.attentions.0.proj_in.lora_B.weight": U},
     "lora_unet_mid_block_attentions_0_proj_in", "peft"),
    ("peft-adapter-name", {"unet.mid_block.attentions.0.proj_in.lora_A.default.weight": D,
                           "unet.mid_block.attentions.0.proj_in.lora_B.default.weight": U},
     "lora_unet_mid_block_attentions_0_proj_in", "peft"),
    ("peft-te-sd1", {"text_encoder.text_model.encoder.layers.2.self_attn.k_proj.lora_A.weight": D,
                     "text_encoder.text_model.encoder.layers.2.self_attn.k_proj.lora_B.weight": U},
     "lora_te_text_model_encoder_layers_2_self_attn_k_proj", "peft"),
    ("peft-te-transformers5-sdxl", {"text_encoder.encoder.layers.2.self_attn.k_proj.lora_A.weight": D,
                                    "text_encoder.encoder.layers.2.self_attn.k_proj.lora_B.weight": U, **_SDXL_MARK},
     "lora_te1_text_model_encoder_layers_2_self_attn_k_proj", "peft"),
    ("diffusers-lora-down", {"unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0.lora.down.weight": D,
                             "unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0.lora.up.weight": U},
     "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0", "diffusers"),
    ("diffusers-linear-layer", {"text_encoder.text_model.encoder.layers.0.mlp.fc2.lora_linear_layer.down.weight": D,
                                "text_encoder.text_model.encoder.layers.0.mlp.fc2.lora_linear_layer.up.weight": U},
     "lora_te_text_model_encoder_layers_0_mlp_fc2", "diffusers"),
    ("legacy-processor", {"unet.down_blocks.0.attentions.1.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": D,
                          "unet.down_blocks.0.attentions.1.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": U},
     "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_out_0", "diffusers_legacy"),
    ("legacy-te", {"text_encoder.text_model.encoder.layers.0.self_attn.to_v_lora.down.weight": D,
                   "text_encoder.text_model.encoder.layers.0.self_attn.to_v_lora.up.weight": U},
     "lora_te_text_model_encoder_layers_0_self_attn_v_proj", "diffusers_legacy"),
    ("raw-peft", {"base_model.model.down_blocks.0.attentions.0.proj_out.lora_A.weight": D,
                  "base_model.model.down_blocks.0.attentions.0.proj_out.lora_B.weight": U},
     "lora_unet_down_blocks_0_attentions_0_proj_out", "peft"),
    ("raw-peft-te", {"base_model.model.text_model.encoder.layers.1.mlp.fc1.lora_A.weight": D,
                     "base_model.model.text_model.encoder.layers.1.mlp.fc1.lora_B.weight": U},
     "lora_te_text_model_encoder_layers_1_mlp_fc1", "peft"),
]


@pytest.mark.parametrize("case", NAMING_CASES, ids=[c[0] for c in NAMING_CASES])
def test_every_naming_family_becomes_canonical(case):
    _, tensors, name, naming = case
    parsed = parse_adapter(tensors)
    assert name in parsed.modules and parsed.unknown == {}
    assert parsed.naming == naming
    assert parsed.modules[name].kind == ("loha" if case[0] == "lycoris-prefix" else "lora")


def test_peft_alpha_tensor_and_rslora_metadata():
    t = {"unet.a.lora_A.weight": torch.zeros(4, 3), "unet.a.lora_B.weight": torch.zeros(5, 4),
         "unet.a.alpha": torch.tensor(2.0)}
    assert parse_adapter(t).modules["lora_unet_a"].scale == 0.5
    md = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8, "unet.use_rslora": True})}
    assert parse_adapter(t, md).modules["lora_unet_a"].scale == pytest.approx(8 / 2)  # alpha / sqrt(r)


def test_unknown_keys_are_kept_verbatim():
    extra = {"bundle_emb.star.string_to_param.*": torch.ones(2, 8), "lora_unet_w.scale": torch.tensor(1.0),
             "text_projection.weight": torch.ones(2, 2), "lora_unet_y.alpha": torch.tensor(1.0),
             "lora_unet_z.lora_mid.weight": torch.ones(1, 1, 3, 3), "lora_unet_w.diff": torch.ones(2, 2),
             "lora_unet_w.alpha": torch.tensor(3.0)}
    t = {"lora_unet_x.lora_down.weight": D, "lora_unet_x.lora_up.weight": U, **extra}
    parsed = parse_adapter(t)
    assert set(parsed.modules) == {"lora_unet_x", "lora_unet_w"}
    assert set(parsed.unknown) == {k for k in extra if k != "lora_unet_w.diff"}
    for k, v in parsed.unknown.items():
        assert v is t[k]


def test_two_spellings_of_one_module_are_refused():
    t = {"lora_te_encoder_layers_0_mlp_fc1.lora_down.weight": D, "lora_te_encoder_layers_0_mlp_fc1.lora_up.weight": U,
         "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": D,
         "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": U}
    with pytest.raises(InvalidFileError, match="stored twice"):
        parse_adapter(t)


def test_mixed_types_in_one_module_are_refused():
    with pytest.raises(InvalidFileError, match="several adapter types"):
        parse_adapter({"lora_unet_x.diff": torch.ones(2, 2), "lora_unet_x.w_norm": torch.ones(2)})


def test_registry_refuses_a_second_claimant():
    with pytest.raises(TypeError, match="claimed by both"):
        class _Clash(AdapterModule):  # noqa: F841
            kind = "clash"
            SUFFIXES = ("clash_w", "lora_down.weight")
    from loratools.adapters.base import registry

    assert "clash_w" not in registry()
    with pytest.raises(TypeError, match="shared suffix"):
        class _Shared(AdapterModule):  # noqa: F841
            kind = "shared"
            SUFFIXES = ("alpha",)


def test_lokr_split_w1_full_w2_hand_values():
    w1_a, w1_b, w2 = torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0, -1.0]]), torch.tensor([[0.0, 1.0], [3.0, 0.0]])
    t = {"lora_unet_k.lokr_w1_a": w1_a, "lora_unet_k.lokr_w1_b": w1_b, "lora_unet_k.lokr_w2": w2,
         "lora_unet_k.alpha": torch.tensor(0.5)}
    m = parse_adapter(t).modules["lora_unet_k"]
    assert (m.rank, m.scale, m.weight_shape) == (1, 0.5, (4, 4))
    w1 = torch.tensor([[1.0, -1.0], [2.0, -2.0]])
    expected = 0.5 * torch.cat([torch.cat([w1[i, j] * w2 for j in range(2)], 1) for i in range(2)], 0)
    torch.testing.assert_close(m.delta(), expected)


def test_lokr_both_full_ignores_alpha():
    t = {"lora_unet_k.lokr_w1": torch.ones(2, 2), "lora_unet_k.lokr_w2": torch.ones(3, 3), "lora_unet_k.alpha": torch.tensor(7.0)}
    m = parse_adapter(t).modules["lora_unet_k"]
    assert m.rank is None and m.scale == 1.0
    assert describe_header({k: tuple(v.shape) for k, v in t.items()}).modules["lora_unet_k"].alpha_key is None


def test_load_adapter_reads_safetensors_and_pickles(tmp_path):
    from loratools.adapters import load_adapter
    from loratools.io.writer import save_tensors

    t = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(2, 4, dtype=torch.float16),
         "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(3, 2, dtype=torch.float16),
         "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0, dtype=torch.float16)}
    save_tensors(tmp_path / "a.safetensors", t, {"ss_network_dim": "2"})
    torch.save(t, tmp_path / "a.pt")
    for name in ("a.safetensors", "a.pt"):
        f = load_adapter(tmp_path / name)
        m = f.modules["lora_te_text_model_encoder_layers_0_mlp_fc1"]
        assert f.path == tmp_path / name and f.naming == "kohya" and m.scale == 0.5
        torch.testing.assert_close(m.delta(), torch.full((3, 4), 1.0))
    assert load_adapter(tmp_path / "a.safetensors").metadata == {"ss_network_dim": "2"}


def test_a1111_scale_tensor_overrides_alpha_and_is_folded_on_write():
    """A1111's `<module>.scale` IS the scale (formats-spec 1.4 item 10); written back as alpha = scale * rank."""
    g = torch.Generator().manual_seed(0)
    D, U = torch.randn(2, 4, generator=g), torch.randn(3, 2, generator=g)
    t = {"lora_unet_x.lora_down.weight": D, "lora_unet_x.lora_up.weight": U, "lora_unet_x.alpha": torch.tensor(1.0),
         "lora_unet_x.scale": torch.tensor(0.75, dtype=torch.float16)}
    parsed = parse_adapter(t)
    m = parsed.modules["lora_unet_x"]
    assert parsed.unknown == {} and m.alpha == 1.0 and m.scale == 0.75
    torch.testing.assert_close(m.delta(), 0.75 * (U.float() @ D.float()))
    written = m.tensors()
    assert "scale" not in written and float(written["alpha"]) == 0.75 * D.shape[0]
    again = parse_adapter({f"lora_unet_x.{k}": v for k, v in written.items()}).modules["lora_unet_x"]
    torch.testing.assert_close(again.delta(), m.delta())
    summary = describe_header({k: tuple(v.shape) for k, v in t.items()})
    assert summary.unknown == [] and summary.modules["lora_unet_x"].scale_key == "lora_unet_x.scale"


def test_stored_alpha_zero_is_read_literally_with_a_warning():
    D, U = torch.ones(2, 4), torch.ones(3, 2)
    t = {"lora_unet_x.lora_down.weight": D, "lora_unet_x.lora_up.weight": U, "lora_unet_x.alpha": torch.tensor(0.0),
         "lora_unet_y.lora_down.weight": D, "lora_unet_y.lora_up.weight": U, "lora_unet_y.alpha": torch.tensor(2.0)}
    parsed = parse_adapter(t)
    assert parsed.modules["lora_unet_x"].scale == 0.0 and not parsed.modules["lora_unet_x"].delta().any()
    assert len(parsed.warnings) == 1 and "1 module(s) store alpha 0 (first: lora_unet_x)" in parsed.warnings[0]
    del t["lora_unet_x.alpha"]  # missing alpha is scale 1, nothing to warn about
    assert parse_adapter(t).warnings == []

"""check weights: statuses, norms from factors, expected-dead explanations, planted problems."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from loratools.adapters import LoHaModule, LoRAModule, load_adapter, parse_adapter
from loratools.errors import UsageError
from loratools.io import save_tensors
from loratools.ops.check_weights import CheckOptions, check_adapter, check_file, delta_norm, parse_fail_on, tensor_stats

FIXTURES = Path(__file__).parent / "fixtures"


def fixture_lora(name: str, *, rank: int = 2, dtype=torch.float32, seed: int = 0) -> tuple[dict, dict]:
    """A LoRA with the real module names and weight shapes of a fixture, at a small rank."""
    fx = json.loads((FIXTURES / name).read_text())
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, info in fx["tensors"].items():
        shape = list(info["shape"])
        if key.endswith(("lora_down.weight", "lora_A.weight")):
            shape[0] = rank
            out[key] = (torch.randn(shape, generator=g) * 0.1).to(dtype)
        elif key.endswith(("lora_up.weight", "lora_B.weight")):
            shape[1] = rank
            out[key] = (torch.randn(shape, generator=g) * 0.01).to(dtype)
        elif key.endswith(".alpha"):
            out[key] = torch.tensor(1.0, dtype=dtype)
    return out, fx["metadata"]


def _kill(t: dict, module: str, how: str) -> None:
    up = t[f"{module}.lora_up.weight"]
    if how == "dead":
        t[f"{module}.lora_up.weight"] = torch.zeros_like(up)
    elif how == "nan":
        up = up.clone()
        up.view(-1)[3] = float("nan")
        t[f"{module}.lora_up.weight"] = up
    elif how == "underflow":  # 1e-7 is under two fp16 subnormal steps: storing it in fp16 changes it by 19 %
        t[f"{module}.lora_up.weight"] = torch.full_like(up, 1e-7)


SD1_LAST = [f"lora_te_text_model_encoder_layers_11_{m}" for m in
            ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")]


@pytest.fixture(scope="module")
def sd1_planted(tmp_path_factory):
    t, meta = fixture_lora("lora_kohya_sd15_lora.json")
    for m in SD1_LAST:
        _kill(t, m, "dead")
    _kill(t, "lora_unet_down_blocks_0_attentions_0_proj_in", "dead")
    _kill(t, "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q", "nan")
    _kill(t, "lora_unet_up_blocks_1_attentions_0_proj_out", "underflow")
    p = tmp_path_factory.mktemp("cw") / "planted.safetensors"
    save_tensors(p, t, meta)
    return p


def test_planted_statuses(sd1_planted):
    r = check_file(sd1_planted)
    by = {m.name: m for m in r.modules}
    assert r.arch == "sd1" and r.clip_skip == 2 and len(r.modules) == 264
    assert r.counts == {"ok": 255, "dead": 7, "nan": 1, "underflow": 1}
    assert all(by[m].status == "dead" and by[m].expected and "clip skip 2" in by[m].expected for m in SD1_LAST)
    dead = by["lora_unet_down_blocks_0_attentions_0_proj_in"]
    assert dead.status == "dead" and dead.expected is None and dead.delta_norm == 0.0
    nan = by["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert nan.status == "nan" and sum(t.nan for t in nan.tensors) == 1
    under = by["lora_unet_up_blocks_1_attentions_0_proj_out"]
    up = next(t for t in under.tensors if t.suffix == "lora_up.weight")
    assert under.status == "underflow" and up.below_fp16_normal == 1.0 and up.fp16_flush == 0.0
    text = " | ".join(r.explanations)
    assert "6 dead, all expected (text-encoder layer 11 is unused at clip skip 2)" in text
    assert "1 dead" in text and "1 with NaN/Inf" in text and "1 underflowing" in text
    assert r.failed


def test_fail_on_selects(sd1_planted):
    adapter = load_adapter(sd1_planted, nonfinite="keep")  # check weights reports NaN itself
    assert check_adapter(adapter, CheckOptions(fail_on=frozenset({"underflow"}))).failed
    t, meta = fixture_lora("lora_kohya_sd15_lora.json")
    for m in SD1_LAST:
        _kill(t, m, "dead")
    clean = check_adapter(parse_adapter(t, meta))
    assert not clean.failed and clean.counts == {"ok": 258, "dead": 6}
    assert clean.explanations == ["6 dead, all expected (text-encoder layer 11 is unused at clip skip 2)"]
    assert parse_fail_on(["dead,nan", "underflow"]) == {"dead", "nan", "underflow"}
    assert parse_fail_on(["none"]) == frozenset()
    with pytest.raises(UsageError, match="unknown status"):
        CheckOptions(fail_on=frozenset({"zombie"}))
    with pytest.raises(UsageError, match="unknown status ok"):  # was accepted, and never failed anything
        CheckOptions(fail_on=frozenset({"ok"}))
    with pytest.raises(UsageError, match="cannot be combined with dead"):  # was "unknown status none"
        parse_fail_on(["none", "dead"])


def test_sdxl_te1_last_layer_expected():
    t, meta = fixture_lora("lora_kohya_sdxl_lora.json", dtype=torch.float16)
    te1_last = [k.split(".")[0] for k in t if k.startswith("lora_te1_text_model_encoder_layers_11_")]
    for m in set(te1_last):
        _kill(t, m, "dead")
    _kill(t, "lora_te2_text_model_encoder_layers_31_mlp_fc1", "dead")  # TE2's last layer IS trained
    r = check_adapter(parse_adapter(t, meta))
    assert r.arch == "sdxl"
    expected = [m for m in r.modules if m.expected]
    assert len(expected) == 6 and all("SDXL text encoder 1 layer 11" in m.expected for m in expected)
    assert [m.name for m in r.modules if m.problem] == ["lora_te2_text_model_encoder_layers_31_mlp_fc1"]
    assert r.failed


def test_fp16_underflow_explained():
    t, meta = fixture_lora("lora_kohya_sd15_lora.json", dtype=torch.float16)
    for k in [k for k in t if k.startswith("lora_unet_") and k.endswith("lora_up.weight")][:40]:
        t[k] = torch.zeros_like(t[k])
    r = check_adapter(parse_adapter(t, meta))
    assert "40 dead: fp16 underflow likely" in " ".join(r.explanations)


def test_no_clip_skip_metadata_assumes_two_for_sd1():
    t, meta = fixture_lora("lora_kohya_sd15_lora.json")
    for m in SD1_LAST:
        _kill(t, m, "dead")
    meta = {k: v for k, v in meta.items() if k != "ss_clip_skip"}
    r = check_adapter(parse_adapter(t, meta))
    assert not r.failed
    assert sum(1 for m in r.modules if m.expected and "clip skip 2 assumed" in m.expected) == 6


def test_norm_hand_computed():
    up, down = torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0, 4.0]])
    m = LoRAModule(name="lora_unet_x", alpha=2.0, up=up, down=down)
    assert delta_norm(m) == pytest.approx(2 * math.sqrt(125), rel=1e-6)  # scale 2 * ||[[3,4],[6,8]]||


@pytest.mark.parametrize("kind", ["linear", "conv3x3", "tucker"])
def test_norm_matches_dense(kind):
    g = torch.Generator().manual_seed(1)
    r = 4
    if kind == "linear":
        m = LoRAModule(name="m", alpha=3.0, down=torch.randn(r, 40, generator=g), up=torch.randn(30, r, generator=g))
    elif kind == "conv3x3":
        m = LoRAModule(name="m", alpha=1.0, down=torch.randn(r, 8, 3, 3, generator=g),
                       up=torch.randn(16, r, 1, 1, generator=g))
    else:
        m = LoRAModule(name="m", alpha=5.0, down=torch.randn(r, 8, 1, 1, generator=g),
                       up=torch.randn(16, r, 1, 1, generator=g), mid=torch.randn(r, r, 3, 3, generator=g))
    dense = float(torch.linalg.vector_norm(m.delta().double()))
    assert delta_norm(m) == pytest.approx(dense, rel=1e-5)


def test_norm_other_types_use_delta():
    g = torch.Generator().manual_seed(2)
    m = LoHaModule(name="m", alpha=1.0, w1_a=torch.randn(6, 2, generator=g), w1_b=torch.randn(2, 5, generator=g),
                   w2_a=torch.randn(6, 2, generator=g), w2_b=torch.randn(2, 5, generator=g))
    w1 = m.w1_a @ m.w1_b
    w2 = m.w2_a @ m.w2_b  # alpha 1 / rank 2 = scale 0.5
    assert delta_norm(m) == pytest.approx(0.5 * float(torch.linalg.vector_norm((w1 * w2).double())), rel=1e-5)


def test_dora_norm_needs_the_base():
    """DoRA's delta rescales the base weight; the norm of its LoRA product was reported as if it were it."""
    g = torch.Generator().manual_seed(3)
    m = LoRAModule(name="m", alpha=2.0, down=torch.randn(2, 5, generator=g), up=torch.randn(6, 2, generator=g),
                   dora_scale=torch.rand(6, 1, generator=g))
    assert delta_norm(m) is None


def test_tensor_stats_hand_values():
    x = torch.tensor([0.0, 2.0 ** -25, -(2.0 ** -24), 3e-5, -1e-3, 5.0, 0.0, 2.0 ** -14])
    s = tensor_stats("k", "lora_up.weight", x)
    assert s.zero_fraction == 2 / 8 and s.min_abs == 0.0 and s.max_abs == 5.0
    assert s.mean_abs == pytest.approx(float(x.abs().mean()))
    assert s.fp16_flush == pytest.approx(1 / 6)  # only 2^-25 rounds to 0 in fp16; 2^-24 survives
    assert s.below_fp16_normal == pytest.approx(3 / 6)  # 2^-25, 2^-24, 3e-5; 2^-14 is normal
    assert int((x[x != 0].half() == 0).sum()) == 1
    n = tensor_stats("k", "s", torch.tensor([1.0, float("nan"), float("inf"), -2.0]))
    assert (n.nan, n.inf, n.mean_abs) == (1, 1, 1.5)


def test_peft_keys_reported_as_stored(tmp_path):
    t, meta = fixture_lora("lora_peft_sdxl.json")
    key = next(k for k in t if k.endswith("lora_B.weight"))
    t[key] = torch.zeros_like(t[key])
    p = tmp_path / "peft.safetensors"
    save_tensors(p, t, meta)
    r = check_file(p)
    dead = [m for m in r.modules if m.status == "dead"]
    assert len(r.modules) == 736 and len(dead) == 1
    assert {x.key for x in dead[0].tensors} == {key, key.replace("lora_B", "lora_A")}

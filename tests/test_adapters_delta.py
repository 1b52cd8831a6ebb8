"""Weight deltas of every adapter type against lycoris-lora 4.1.3's own modules and hand values.

One table of cases across types (STYLE item 11): each case builds the LyCORIS module on a tiny
``nn.Linear`` / ``nn.Conv2d`` / norm layer with random factors, runs LyCORIS' training forward,
saves the module's state dict under a ``lycoris_`` name, parses it with ``parse_adapter`` and
checks that the base layer with our delta added gives the same output.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lycoris.modules.full import FullModule as LyFull
from lycoris.modules.ia3 import IA3Module as LyIA3
from lycoris.modules.locon import LoConModule as LyLoCon
from lycoris.modules.loha import LohaModule as LyLoha
from lycoris.modules.lokr import LokrModule as LyLokr
from lycoris.modules.norms import NormModule as LyNorm

from loratools.adapters import LoRAModule, parse_adapter


LIN = ("linear", 24, 32)
CONV3 = ("conv", 24, 32, (3, 3))
CONV31 = ("conv", 24, 32, (3, 1))
CONV1 = ("conv", 24, 32, (1, 1))
BIG_LIN = ("linear", 64, 64)
BIG_CONV = ("conv", 64, 64, (3, 3))

# id, LyCORIS class, layer spec, constructor kwargs, expected kind
CASES = [
    ("lora-linear", LyLoCon, LIN, dict(lora_dim=4, alpha=2), "lora"),
    ("locon-1x1", LyLoCon, CONV1, dict(lora_dim=4, alpha=8), "lora"),
    ("locon-3x1", LyLoCon, CONV31, dict(lora_dim=4, alpha=1), "lora"),
    ("locon-tucker", LyLoCon, CONV3, dict(lora_dim=4, alpha=2, use_tucker=True), "lora"),
    ("dora-out-linear", LyLoCon, LIN, dict(lora_dim=4, alpha=2, weight_decompose=True, wd_on_out=True), "lora"),
    ("dora-in-linear", LyLoCon, LIN, dict(lora_dim=4, alpha=2, weight_decompose=True, wd_on_out=False), "lora"),
    ("dora-out-conv", LyLoCon, CONV3, dict(lora_dim=4, alpha=2, weight_decompose=True, wd_on_out=True), "lora"),
    ("dora-in-conv", LyLoCon, CONV3, dict(lora_dim=4, alpha=2, weight_decompose=True, wd_on_out=False), "lora"),
    ("loha-linear", LyLoha, LIN, dict(lora_dim=4, alpha=2), "loha"),
    ("loha-conv", LyLoha, CONV31, dict(lora_dim=4, alpha=3), "loha"),
    ("loha-tucker", LyLoha, CONV3, dict(lora_dim=4, alpha=2, use_tucker=True), "loha"),
    ("loha-dora", LyLoha, LIN, dict(lora_dim=4, alpha=2, weight_decompose=True), "loha"),
    ("lokr-full-full", LyLokr, LIN, dict(lora_dim=8, alpha=3, factor=4), "lokr"),
    ("lokr-w2-split", LyLokr, BIG_LIN, dict(lora_dim=2, alpha=1, factor=8), "lokr"),
    ("lokr-both-split", LyLokr, BIG_LIN, dict(lora_dim=2, alpha=3, factor=8, decompose_both=True), "lokr"),
    ("lokr-conv", LyLokr, BIG_CONV, dict(lora_dim=2, alpha=1, factor=8), "lokr"),
    ("lokr-tucker", LyLokr, BIG_CONV, dict(lora_dim=2, alpha=1, factor=8, use_tucker=True), "lokr"),
    ("lokr-dora", LyLokr, BIG_LIN, dict(lora_dim=2, alpha=1, factor=8, weight_decompose=True), "lokr"),
    ("ia3-out", LyIA3, LIN, {}, "ia3"),
    ("ia3-in-conv", LyIA3, CONV3, dict(train_on_input=True), "ia3"),
    ("full", LyFull, LIN, {}, "full"),
    ("full-conv", LyFull, CONV3, {}, "full"),
]


def _layer(spec: tuple) -> nn.Module:
    if spec[0] == "linear":
        return nn.Linear(spec[1], spec[2])
    return nn.Conv2d(spec[1], spec[2], spec[3], padding=tuple(k // 2 for k in spec[3]))


def _input(spec: tuple) -> torch.Tensor:
    return torch.randn(3, spec[1]) if spec[0] == "linear" else torch.randn(2, spec[1], 5, 6)


def _apply(layer: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, w, b)
    return F.conv2d(x, w, b, padding=layer.padding)


def _lycoris(cls, layer: nn.Module, kwargs: dict):
    module = cls("lycoris_layer", layer, 1.0, **kwargs)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
        if getattr(module, "dora_scale", None) is not None:  # a magnitude away from the base norm
            module.dora_scale.mul_(1.3)
    module.apply_to()
    return module


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_delta_equals_lycoris_training_forward(case):
    _, cls, spec, kwargs, kind = case
    torch.manual_seed(0)
    layer = _layer(spec)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    module = _lycoris(cls, layer, kwargs)
    x = _input(spec)
    with torch.no_grad():
        expected = module(x)
    state = {f"lycoris_layer.{k}": v.detach().clone() for k, v in module.state_dict().items()}

    parsed = parse_adapter(state)
    assert parsed.unknown == {}
    assert parsed.naming == "lycoris"
    ours = parsed.modules["lora_unet_layer"]
    assert ours.kind == kind
    dw = ours.delta(w).reshape(w.shape)
    db = ours.bias_delta()
    got = _apply(layer, x, w + dw, b if db is None else b + db)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_norm_delta_equals_lycoris_forward():
    torch.manual_seed(0)
    norm = nn.GroupNorm(4, 16)
    w, b = norm.weight.detach().clone(), norm.bias.detach().clone()
    module = _lycoris(LyNorm, norm, {})
    x = torch.randn(2, 16, 3, 3)
    with torch.no_grad():
        expected = module(x)
    parsed = parse_adapter({f"lycoris_norm.{k}": v.detach() for k, v in module.state_dict().items()})
    ours = parsed.modules["lora_unet_norm"]
    assert ours.kind == "norm" and parsed.unknown == {}
    got = F.group_norm(x, 4, w + ours.delta(), b + ours.bias_delta(), norm.eps)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls,spec,kwargs", [
    (LyLoha, LIN, dict(lora_dim=4, alpha=2)),
    (LyLokr, BIG_LIN, dict(lora_dim=2, alpha=1, factor=8)),
])
def test_lycoris_merge_path_scales_twice_and_we_scale_once(cls, spec, kwargs):
    """lycoris' get_diff_weight (its merge path) multiplies by alpha/r a second time."""
    torch.manual_seed(1)
    layer = _layer(spec)
    w = layer.weight.detach().clone()
    module = _lycoris(cls, layer, kwargs)
    ours = parse_adapter({f"lycoris_layer.{k}": v.detach() for k, v in module.state_dict().items()}
                         ).modules["lora_unet_layer"]
    s = ours.scale
    assert s == pytest.approx(kwargs["alpha"] / kwargs["lora_dim"]) and s != 1
    with torch.no_grad():
        merge_path = module.get_diff_weight()[0].reshape(w.shape)
    torch.testing.assert_close(merge_path, ours.delta() * s, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(merge_path, ours.delta(), rtol=1e-3, atol=1e-6)


def _lora(down, up, alpha=None, mid=None):
    t = {"lora_unet_m.lora_down.weight": torch.tensor(down, dtype=torch.float16),
         "lora_unet_m.lora_up.weight": torch.tensor(up, dtype=torch.float16)}
    if alpha is not None:
        t["lora_unet_m.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    return parse_adapter(t).modules["lora_unet_m"]


@pytest.mark.parametrize("down,up,alpha,expected", [
    # linear: rank 1, up [3, 4] x down [1, 2], alpha 0.5 -> scale 0.5
    ([[1.0, 2.0]], [[3.0], [4.0]], 0.5, [[1.5, 3.0], [2.0, 4.0]]),
    # missing alpha: scale 1
    ([[1.0, 2.0]], [[3.0], [4.0]], None, [[3.0, 6.0], [4.0, 8.0]]),
    # rank 2, alpha 1 -> scale 0.5: 0.5 * [[1,0],[0,2]] @ [[1,1],[2,0]]
    ([[1.0, 1.0], [2.0, 0.0]], [[1.0, 0.0], [0.0, 2.0]], 1.0, [[0.5, 0.5], [2.0, 0.0]]),
    # k x k conv, non-square 2x1 kernel: down (1, 1, 2, 1), up (2, 1, 1, 1)
    ([[[[1.0], [2.0]]]], [[[[3.0]]], [[[4.0]]]], None, [[[[3.0], [6.0]]], [[[4.0], [8.0]]]]),
    # 1x1 conv, alpha stored with shape (1,)
    ([[[[2.0]], [[1.0]]]], [[[[1.0]]]], [1.0], [[[[2.0]], [[1.0]]]]),
])
def test_lora_delta_hand_values(down, up, alpha, expected):
    m = _lora(down, up, alpha)
    assert m.delta().dtype == torch.float32
    torch.testing.assert_close(m.delta(), torch.tensor(expected))


def test_tucker_delta_equals_three_chained_convs():
    """Tucker LoCon: down 1x1 -> mid kxk -> up 1x1 applied in sequence is one conv with our delta."""
    torch.manual_seed(2)
    down, mid, up = torch.randn(3, 5, 1, 1), torch.randn(3, 3, 3, 2), torch.randn(7, 3, 1, 1)
    m = _lora(down.tolist(), up.tolist(), 1.5, None)
    m = LoRAModule(name=m.name, alpha=1.5, down=down, up=up, mid=mid)
    x = torch.randn(2, 5, 6, 6)
    chained = F.conv2d(F.conv2d(F.conv2d(x, down), mid), up) * (1.5 / 3)
    torch.testing.assert_close(F.conv2d(x, m.delta()), chained, rtol=1e-5, atol=1e-5)
    einsum = torch.einsum("oa,abhw,bi->oihw", up.flatten(1), mid, down.flatten(1)) * 0.5
    torch.testing.assert_close(m.delta(), einsum)


def test_dora_from_peft_magnitude_vector_is_output_axis():
    """PEFT's lora_magnitude_vector (out,) is DoRA on the output axis: W' = m * V / ||V||_row."""
    torch.manual_seed(3)
    w, down, up, mag = torch.randn(6, 4), torch.randn(2, 4), torch.randn(6, 2), torch.rand(6) + 0.5
    parsed = parse_adapter({"unet.m.lora_A.weight": down, "unet.m.lora_B.weight": up,
                            "unet.m.lora_magnitude_vector": mag})
    m = parsed.modules["lora_unet_m"]
    assert m.needs_base and parsed.unknown == {}
    v = w + up @ down
    expected = mag[:, None] * v / v.norm(dim=1, keepdim=True) - w
    torch.testing.assert_close(m.delta(w), expected, rtol=1e-5, atol=1e-5)


def test_dora_input_axis_hand_computed():
    w = torch.tensor([[3.0, 0.0], [4.0, 1.0]])
    t = {"lora_unet_m.lora_down.weight": torch.zeros(1, 2), "lora_unet_m.lora_up.weight": torch.zeros(2, 1),
         "lora_unet_m.dora_scale": torch.tensor([[10.0, 2.0]])}
    m = parse_adapter(t).modules["lora_unet_m"]
    # column norms of W are 5 and 1: columns rescaled to lengths 10 and 2
    torch.testing.assert_close(m.delta(w) + w, torch.tensor([[6.0, 0.0], [8.0, 2.0]]))


def test_nonfinite_delta_names_the_module():
    from loratools.errors import NonFiniteError

    m = _lora([[1.0, float("inf")]], [[1.0]])
    with pytest.raises(NonFiniteError, match="lora_unet_m"):
        m.delta()


def test_tensors_round_trip_through_parse():
    torch.manual_seed(4)
    for case in CASES:
        _, cls, spec, kwargs, _ = case
        module = _lycoris(cls, _layer(spec), kwargs)
        state = {f"lycoris_layer.{k}": v.detach() for k, v in module.state_dict().items()}
        ours = parse_adapter(state).modules["lora_unet_layer"]
        again = parse_adapter({f"lora_unet_layer.{k}": v for k, v in ours.tensors().items()})
        assert again.unknown == {}
        m2 = again.modules["lora_unet_layer"]
        assert (m2.kind, m2.rank, m2.scale) == (ours.kind, ours.rank, ours.scale), case[0]
        if not ours.needs_base:
            torch.testing.assert_close(m2.delta(), ours.delta())
        assert math.isfinite(ours.scale)


class _TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 6)
        self.conv = nn.Conv2d(5, 7, 3, padding=1)


@pytest.mark.parametrize("dora", [False, True])
def test_peft_state_dict_and_config_match_peft_forward(dora):
    """A raw PEFT model (alpha_pattern, rsLoRA off, DoRA on Linear and Conv2d) against PEFT itself."""
    import json

    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(5)
    model = _TwoLayers()
    base = {n: (m.weight.detach().clone(), m.bias.detach().clone()) for n, m in (("lin", model.lin), ("conv", model.conv))}
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["lin", "conv"], use_dora=dora, alpha_pattern={"conv": 2},
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1.2)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    metadata = {"lora_adapter_metadata": json.dumps(config.to_dict(), default=sorted)}
    parsed = parse_adapter(state, metadata)
    assert parsed.unknown == {} and parsed.naming == "peft"
    x_lin, x_conv = torch.randn(3, 8), torch.randn(2, 5, 4, 4)
    with torch.no_grad():
        expected = {"lin": peft_model.base_model.model.lin(x_lin), "conv": peft_model.base_model.model.conv(x_conv)}
    for name, x, op in (("lin", x_lin, F.linear), ("conv", x_conv, lambda x, w, b: F.conv2d(x, w, b, padding=1))):
        m = parsed.modules[f"lora_unet_{name}"]
        assert m.scale == (2.0 if name == "lin" else 0.5)
        w, b = base[name]
        torch.testing.assert_close(op(x, w + m.delta(w).reshape(w.shape), b), expected[name], rtol=1e-5, atol=1e-5)

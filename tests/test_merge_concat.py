"""Exact LoRA + LoRA combination: the combined module's delta is the weighted sum of the members'.

Deltas are computed by ``loratools.adapters`` (an implementation independent of the concat maths)
and compared in float64 against the sum of the members' own deltas.
"""

from __future__ import annotations

import math

import pytest
import torch

from loratools.adapters import FullModule, LoHaModule, LoKrModule, LoRAModule
from loratools.errors import UsageError
from loratools.ops.merge.concat import LoraFactors, concat_factors
from loratools.ops.merge.to_lora import combine_layer


def _lora(gen, out, inp, rank, alpha, kernel=None, tucker=False, name="m"):
    if tucker:
        down = torch.randn(rank, inp, 1, 1, generator=gen)
        mid = torch.randn(rank, rank, *kernel, generator=gen)
        up = torch.randn(out, rank, 1, 1, generator=gen)
        return LoRAModule(name=name, alpha=alpha, down=down, up=up, mid=mid)
    down = torch.randn(rank, inp, *(kernel or ()), generator=gen)
    up = torch.randn(out, rank, *((1, 1) if kernel else ()), generator=gen)
    return LoRAModule(name=name, alpha=alpha, down=down, up=up)


def _expected(members):
    shape = members[0][1].weight_shape
    return sum(w * m.delta().double().reshape(shape) for w, m in members)


def _delta_of(name, tensors):
    module = LoRAModule.parse(name, tensors)
    return module.delta().double()


@pytest.mark.parametrize("case", ["linear", "conv3x3", "tucker", "tucker+plain", "2d+1x1"])
def test_concat_equals_weighted_sum(case):
    gen = torch.Generator().manual_seed(1)
    if case == "linear":
        members = [(0.7, _lora(gen, 24, 16, 4, 2.0)), (-0.4, _lora(gen, 24, 16, 8, 8.0)), (1.3, _lora(gen, 24, 16, 2, 0.5))]
    elif case == "conv3x3":
        members = [(0.6, _lora(gen, 12, 8, 4, 1.0, (3, 3))), (0.5, _lora(gen, 12, 8, 6, 3.0, (3, 3)))]
    elif case == "tucker":
        members = [(0.6, _lora(gen, 12, 8, 4, 1.0, (3, 3), True)), (-0.8, _lora(gen, 12, 8, 3, 3.0, (3, 3), True))]
    elif case == "tucker+plain":
        members = [(0.6, _lora(gen, 12, 8, 4, 1.0, (3, 3), True)), (0.9, _lora(gen, 12, 8, 5, 2.0, (3, 3)))]
    else:
        flat = _lora(gen, 16, 16, 4, 4.0)
        conv = _lora(gen, 16, 16, 2, 1.0, (1, 1))
        members = [(1.0, flat), (0.5, conv)]
    out = combine_layer("m", members, torch.float16)
    assert out["lora_down.weight"].shape[0] == sum(m.rank for _, m in members)
    assert ("lora_mid.weight" in out) == (case == "tucker")
    got = _delta_of("m", out).reshape(_expected(members).shape)
    want = _expected(members)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_alpha_is_representable_in_the_output_dtype_and_balanced():
    gen = torch.Generator().manual_seed(2)
    a = LoraFactors(torch.randn(8, 3, generator=gen), torch.randn(3, 5, generator=gen), scale=0.37)
    b = LoraFactors(torch.randn(8, 5, generator=gen), torch.randn(5, 5, generator=gen), scale=1.9)
    res = concat_factors([(0.3, a), (2.0, b)], alpha_dtype=torch.float16)
    assert torch.tensor(res.alpha, dtype=torch.float16).item() == res.alpha
    # A2.9: the per-member factors f_j have a rank-weighted geometric mean of 1 (up to alpha rounding).
    per_rank = res.alpha / res.rank
    f = [0.3 * 0.37 / per_rank, 2.0 * 1.9 / per_rank]
    assert math.isclose((f[0] ** 3 * f[1] ** 5) ** (1 / 8), 1.0, rel_tol=2e-3)
    want = 0.3 * 0.37 * a.up @ a.down + 2.0 * 1.9 * b.up @ b.down
    assert torch.allclose(per_rank * res.up @ res.down, want, rtol=1e-5, atol=1e-5)


def test_zero_weight_members_are_dropped():
    gen = torch.Generator().manual_seed(3)
    a, b = _lora(gen, 6, 4, 2, 1.0), _lora(gen, 6, 4, 3, 1.0)
    out = combine_layer("m", [(0.0, a), (0.5, b)], torch.float32)
    assert out["lora_down.weight"].shape[0] == 3
    assert combine_layer("m", [(0.0, a)], torch.float32) is None


def test_mismatched_shapes_are_refused():
    gen = torch.Generator().manual_seed(4)
    with pytest.raises(UsageError, match="same weight shape"):
        combine_layer("m", [(1.0, _lora(gen, 6, 4, 2, 1.0)), (1.0, _lora(gen, 7, 4, 2, 1.0))], torch.float32)


def test_single_lycoris_member_gets_its_weight_folded_in():
    gen = torch.Generator().manual_seed(5)
    loha = LoHaModule(name="m", alpha=2.0, w1_a=torch.randn(6, 3, generator=gen), w1_b=torch.randn(3, 4, generator=gen),
                      w2_a=torch.randn(6, 3, generator=gen), w2_b=torch.randn(3, 4, generator=gen))
    out = combine_layer("m", [(-0.6, loha)], torch.float16)
    assert torch.allclose(LoHaModule.parse("m", out).delta(), -0.6 * loha.delta(), rtol=1e-5, atol=1e-6)
    lokr = LoKrModule(name="m", alpha=2.0, w1=torch.randn(2, 2, generator=gen),
                      w2_a=torch.randn(3, 2, generator=gen), w2_b=torch.randn(2, 4, generator=gen))
    out = combine_layer("m", [(0.3, lokr)], torch.float16)
    assert torch.allclose(LoKrModule.parse("m", out).delta(), 0.3 * lokr.delta(), rtol=1e-5, atol=1e-6)


def test_lora_plus_full_becomes_one_full_diff():
    gen = torch.Generator().manual_seed(6)
    lora = _lora(gen, 6, 4, 2, 1.0)
    full = FullModule(name="m", diff=torch.randn(6, 4, generator=gen), diff_b=torch.randn(6, generator=gen))
    out = combine_layer("m", [(0.5, lora), (2.0, full)], torch.float32)
    assert torch.allclose(out["diff"], 0.5 * lora.delta() + 2.0 * full.diff)
    assert torch.allclose(out["diff_b"], 2.0 * full.diff_b)


def test_inexact_combinations_are_refused_with_a_hint():
    gen = torch.Generator().manual_seed(7)

    def loha():
        return LoHaModule(name="m", alpha=2.0, w1_a=torch.randn(6, 3, generator=gen), w1_b=torch.randn(3, 4, generator=gen),
                          w2_a=torch.randn(6, 3, generator=gen), w2_b=torch.randn(3, 4, generator=gen))
    with pytest.raises(UsageError, match="no exact"):
        combine_layer("m", [(1.0, loha()), (1.0, loha())], torch.float32)
    dora = LoRAModule(name="m", alpha=1.0, down=torch.randn(2, 4), up=torch.randn(6, 2), dora_scale=torch.ones(6, 1))
    with pytest.raises(UsageError, match="DoRA"):
        combine_layer("m", [(0.5, dora)], torch.float32)

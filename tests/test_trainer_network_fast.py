"""The lean LoRA-form forward and the batched max-norm (`trainer.network.fast`) against independent
computations: float64 references, LyCORIS' own forward and delta, autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.network.fast import FactorPair, MaxNormGroup, lean_forward


def _factors(org: nn.Module, rank: int, seed: int) -> tuple[nn.Module, nn.Module]:
    g = torch.Generator().manual_seed(seed)
    if isinstance(org, nn.Conv2d):
        down = nn.Conv2d(org.in_channels, rank, org.kernel_size, org.stride, org.padding, bias=False)
        up = nn.Conv2d(rank, org.out_channels, 1, bias=False)
    else:
        down, up = nn.Linear(org.in_features, rank, bias=False), nn.Linear(rank, org.out_features, bias=False)
    with torch.no_grad():
        down.weight.copy_(torch.randn(down.weight.shape, generator=g))
        up.weight.copy_(torch.randn(up.weight.shape, generator=g))
    return down, up


CASES = [
    (lambda: nn.Linear(12, 7), (5, 12)),           # 2-D input
    (lambda: nn.Linear(12, 7), (2, 9, 12)),        # tokens
    (lambda: nn.Conv2d(6, 5, 3, padding=1), (2, 6, 7, 7)),
    (lambda: nn.Conv2d(6, 5, 3, stride=2, padding=1), (1, 6, 8, 8)),
    (lambda: nn.Conv2d(6, 5, 1), (2, 6, 4, 4)),
]


@pytest.mark.parametrize("make,shape", CASES)
def test_lean_forward_equals_base_plus_scaled_product_in_float64(make, shape):
    torch.manual_seed(0)
    org = make()
    down, up = _factors(org, 3, 1)
    x = torch.randn(shape)
    forward = lean_forward(org.forward, down, up, lambda: 0.75)
    got = forward(x)
    with torch.no_grad():
        x64 = x.double()
        if isinstance(org, nn.Conv2d):
            conv = nn.functional.conv2d
            base = conv(x64, org.weight.double(), org.bias.double(), org.stride, org.padding)
            delta = conv(conv(x64, down.weight.double(), None, org.stride, org.padding), up.weight.double())
        else:
            base = x64 @ org.weight.double().T + org.bias.double()
            delta = x64 @ down.weight.double().T @ up.weight.double().T
    torch.testing.assert_close(got.double(), base + 0.75 * delta, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make,shape", CASES)
def test_lean_forward_under_bf16_autocast_matches_and_keeps_the_dtype(make, shape):
    torch.manual_seed(0)
    org = make()
    down, up = _factors(org, 3, 2)
    x = torch.randn(shape)
    reference = lean_forward(org.forward, down, up, lambda: 0.5)(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lean_forward(org.forward, down, up, lambda: 0.5)(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), reference, rtol=5e-2, atol=5e-2 * reference.abs().max().item())


def test_lean_forward_casts_when_the_network_is_half_and_autocast_is_off():
    """--full_fp16 on a float32 base (a CPU run): fp16 factors, float32 activations in and out."""
    org = nn.Linear(8, 4)
    down, up = _factors(org, 2, 3)
    down.half(), up.half()
    x = torch.randn(3, 8)
    got = lean_forward(org.forward, down, up, lambda: 1.0)(x)
    expected = org(x) + (x @ down.weight.float().T) @ up.weight.float().T
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)


def test_lean_forward_backward_gives_the_factor_gradients_of_the_plain_form():
    torch.manual_seed(0)
    org = nn.Linear(10, 6)
    down, up = _factors(org, 4, 4)
    x = torch.randn(2, 5, 10)
    lean_forward(org.forward, down, up, lambda: 0.3)(x).square().sum().backward()
    lean = (down.weight.grad.clone(), up.weight.grad.clone())
    down.weight.grad = up.weight.grad = None
    (org(x) + 0.3 * up(down(x))).square().sum().backward()
    torch.testing.assert_close(lean[0], down.weight.grad)
    torch.testing.assert_close(lean[1], up.weight.grad)


def _lycoris_network(unet, tes, args):
    from trainer.network.lycoris_net import LycorisAdapter

    return LycorisAdapter("sd1", unet, tes, 4, 2.0, None, args, train_unet=True, train_text_encoder=True)


def test_lycoris_locon_modules_get_the_lean_forward_with_lycoris_own_numbers():
    """Every plain LoCon module of preset=full is switched to the lean forward, and each one's output
    equals LyCORIS' own bypass forward (the independent implementation) on random factors."""
    from loratools.tiny import build_pipeline

    pipe = build_pipeline("sd1", seed=3)
    net = _lycoris_network(pipe.unet, [pipe.text_encoder], {"algo": "locon", "preset": "full", "conv_dim": "4",
                                                           "conv_alpha": "1"})
    assert net._lean and not net._other
    g = torch.Generator().manual_seed(5)
    checked = 0
    for lora in net._lean[:: max(1, len(net._lean) // 12)]:
        with torch.no_grad():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=g) * 0.1)
        org = lora.org_module[0]
        if isinstance(org, nn.Conv2d):
            x = torch.randn(1, org.in_channels, 8, 8, generator=g)
        else:
            x = torch.randn(2, 3, org.in_features, generator=g)
        with torch.no_grad():
            got = org(x)
            reference = type(lora).bypass_forward(lora, x, scale=lora.multiplier)
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
        checked += 1
    assert checked >= 10


def test_lycoris_modules_with_dropout_keep_their_own_forward():
    from loratools.tiny import build_pipeline

    pipe = build_pipeline("sd1", seed=3)
    net = _lycoris_network(pipe.unet, [pipe.text_encoder], {"algo": "locon", "preset": "attn-only",
                                                           "rank_dropout": "0.2"})
    assert not net._lean and net._other


def test_max_norm_group_matches_lycoris_deltas_and_scales_only_large_modules():
    """Norms from r x r Gram matrices equal ‖ΔW‖ of LyCORIS' own `get_diff_weight`; modules above
    X are brought to X exactly, modules below X/2 keep their factors bit for bit."""
    from loratools.tiny import build_pipeline

    pipe = build_pipeline("sd1", seed=4)
    net = _lycoris_network(pipe.unet, [pipe.text_encoder], {"algo": "locon", "preset": "full", "conv_dim": "4",
                                                           "conv_alpha": "2"})
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for i, lora in enumerate(net._lean):
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=g) * (3.0 if i % 2 else 1e-4))
    before = {id(m): (m.lora_up.weight.clone(), m.lora_down.weight.clone()) for m in net._lean}
    with torch.no_grad():
        norms = [float(m.get_diff_weight()[0].norm()) for m in net._lean]
    ordered = sorted(norms)
    limit = (ordered[len(ordered) // 2] + ordered[len(ordered) // 2 + 1]) / 2  # between two norms: no ties
    scaled, mean, peak = net.apply_max_norm_regularization(limit)
    assert scaled == sum(n > limit for n in norms)
    assert peak == pytest.approx(limit, rel=1e-4)
    for m, n in zip(net._lean, norms):
        with torch.no_grad():
            after = float(m.get_diff_weight()[0].norm())
        if n > limit:
            assert after == pytest.approx(limit, rel=1e-4)
        elif n < limit / 2:
            assert torch.equal(m.lora_up.weight, before[id(m)][0]) and torch.equal(m.lora_down.weight, before[id(m)][1])
    expected_mean = sum(min(n, limit) for n in norms) / len(norms)
    assert mean == pytest.approx(expected_mean, rel=1e-4)


def test_max_norm_group_groups_by_shape_and_dtype():
    g = torch.Generator().manual_seed(0)
    pairs = [FactorPair(torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g), 0.5),
             FactorPair(torch.randn(6, 2, generator=g).bfloat16(), torch.randn(2, 5, generator=g).bfloat16(), 1.0),
             FactorPair(torch.randn(4, 3, 1, 1, generator=g), torch.randn(3, 2, 3, 3, generator=g), 2.0)]
    dense = [float((p.up.float().reshape(p.up.shape[0], -1) @ p.down.float().reshape(p.down.shape[0], -1)).norm())
             * p.scale for p in pairs]
    scaled, mean, peak = MaxNormGroup(lambda: pairs).apply(1e9)
    assert scaled == 0 and peak == pytest.approx(max(dense), rel=1e-3)
    assert mean == pytest.approx(sum(dense) / 3, rel=1e-3)


def test_max_norm_group_work_grows_with_shapes_not_with_modules():
    """A host-bound GPU step pays per operator: 200 modules of one shape, half of them scaled, cost
    the same fixed set of operators as 2 (one stack, Gram product and write-back per shape)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    def ops_for(n: int) -> int:
        g = torch.Generator().manual_seed(n)
        pairs = [FactorPair(torch.randn(8, 2, generator=g) * (10 if i % 2 else 1e-3), torch.randn(2, 6, generator=g), 1.0)
                 for i in range(n)]
        group = MaxNormGroup(lambda: pairs)
        group.apply(1.0)  # builds the plan
        Count.ops = 0
        with Count():
            scaled, _, peak = group.apply(1.0)
        assert peak == pytest.approx(1.0, rel=1e-5)
        return Count.ops

    assert ops_for(200) == ops_for(2)

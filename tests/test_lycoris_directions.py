"""LoHa and LoKr ``directions()``: the reduced module in its own form, checked against dense
computations (the delta, its truncations, its left-out Frobenius norm) and through a real file
(write -> parse -> delta, so alpha and the parser's scale rule round-trip)."""

from __future__ import annotations

import math

import pytest
import torch

from loratools.adapters import load_adapter
from loratools.adapters.loha import LoHaModule, hadamard_left_out_sq
from loratools.adapters.lokr import LoKrModule
from loratools.adapters.reduce import antitonic, product_svd
from loratools.io import save_tensors
from loratools.io.dtypes import from_torch


def _g(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)


def _dense(m) -> torch.Tensor:
    return m.delta().double().reshape(m.delta().shape[0], -1)


def _through_file(tmp_path, cls, tensors, name="lora_unet_x"):
    """Write ``tensors`` as one module, read it back with the real loader, return the module."""
    path = tmp_path / f"m{len(list(tmp_path.iterdir()))}.safetensors"
    save_tensors(path, {f"{name}.{s}": t for s, t in tensors.items()})
    (m,) = load_adapter(path).modules.values()
    assert isinstance(m, cls)
    return m


def _numel(tensors) -> int:
    return sum(t.numel() for s, t in tensors.items() if s not in ("alpha", "dora_scale"))


# ---------------------------------------------------------------------------------------------- LoKr
def _lokr_variants():
    r = _g(1)
    return {
        "w1 full, w2 split": {"lokr_w1": r(4, 3), "lokr_w2_a": r(10, 4), "lokr_w2_b": r(4, 12), "alpha": 2.0},
        "both split": {"lokr_w1_a": r(4, 2), "lokr_w1_b": r(2, 3), "lokr_w2_a": r(10, 4), "lokr_w2_b": r(4, 12),
                       "alpha": 3.0},
        "w1 split, w2 full": {"lokr_w1_a": r(6, 4), "lokr_w1_b": r(4, 5), "lokr_w2": r(10, 12), "alpha": 2.0},
        "both full": {"lokr_w1": r(4, 3), "lokr_w2": r(10, 12), "alpha": 7.0},
        "both full, conv": {"lokr_w1": r(2, 3), "lokr_w2": r(10, 4, 3, 3)},
        "w2 split, conv": {"lokr_w1": r(2, 3), "lokr_w2_a": r(8, 4), "lokr_w2_b": r(4, 5 * 9), "alpha": 1.0},
        "w2 tucker": {"lokr_w1": r(2, 3), "lokr_t2": r(4, 4, 3, 3), "lokr_w2_a": r(4, 10), "lokr_w2_b": r(4, 6),
                      "alpha": 8.0},
    }


def _tensors(spec):
    return {s: (torch.tensor(v, dtype=torch.float64) if isinstance(v, float) else v) for s, v in spec.items()}


@pytest.mark.parametrize("variant", list(_lokr_variants()))
def test_lokr_every_variant_left_out_norm_is_exact(variant, tmp_path):
    m = LoKrModule.parse("x", _tensors(_lokr_variants()[variant]))
    d = m.directions()
    full = _dense(m)
    assert d.kind == "lokr" and d.full_len == torch.from_numpy(d.S).numel()
    assert bool((torch.from_numpy(d.S)[:-1] >= torch.from_numpy(d.S)[1:]).all())
    assert float(torch.from_numpy(d.S).double().norm()) == pytest.approx(float(full.norm()), rel=1e-5)
    n = torch.from_numpy(d.S).numel()
    gen = torch.Generator().manual_seed(0)
    for k in range(1, n + 1):
        keep = sorted(torch.randperm(n, generator=gen)[:k].tolist())  # any subset: strengths are exact
        reduced = d.tensors(keep, torch.float64)
        assert {s: (tuple(t.shape), from_torch(t.dtype)) for s, t in reduced.items()} == d.specs(k, torch.float64)
        got = _dense(_through_file(tmp_path, LoKrModule, reduced))
        dropped = [i for i in range(n) if i not in keep]
        left_out = float((full - got.reshape(full.shape)).norm())
        assert left_out == pytest.approx(float(torch.from_numpy(d.S)[dropped].double().norm()), rel=1e-5, abs=1e-6 * float(full.norm()))
        assert _numel(reduced) <= _numel(m.tensors())  # the own form never grows


@pytest.mark.parametrize("variant", list(_lokr_variants()))
def test_lokr_full_keep_is_exact_with_rescale_through_the_parser(variant, tmp_path):
    m = LoKrModule.parse("x", _tensors(_lokr_variants()[variant]))
    d = m.directions()
    got = _through_file(tmp_path, LoKrModule, d.tensors(range(torch.from_numpy(d.S).numel()), torch.float32, rescale=0.5))
    want = 0.5 * m.delta()
    torch.testing.assert_close(got.delta().reshape(want.shape), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_lokr_strengths_by_hand():
    # kron(W1, W2) with W1 = [[3, 4]] (norm 5), W2 = diag(2, 1) split as a @ b: scale = 6 / 2 = 3
    m = LoKrModule.parse("x", {"lokr_w1": torch.tensor([[3.0, 4.0]]), "lokr_w2_a": torch.eye(2),
                               "lokr_w2_b": torch.diag(torch.tensor([2.0, 1.0])), "alpha": torch.tensor(6.0)})
    d = m.directions()
    torch.testing.assert_close(torch.from_numpy(d.S), torch.tensor([30.0, 15.0]))
    t = d.tensors([0], torch.float32)
    assert float(t["alpha"]) == pytest.approx(3.0)  # alpha' = scale * k keeps alpha / rank = 3
    assert t["lokr_w2_a"].shape == (2, 1) and torch.equal(t["lokr_w1"], m.w1)


def test_lokr_full_w2_becomes_lowrank_only_when_smaller():
    r = _g(2)
    d = LoKrModule.parse("x", {"lokr_w1": r(2, 2), "lokr_w2": r(8, 8)}).directions()
    assert set(d.specs(3, torch.float16)) == {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}  # 3*16 < 64
    t = d.tensors(range(3), torch.float16)
    assert float(t["alpha"]) == 3.0  # scale 1 as before: alpha = rank
    assert set(d.specs(4, torch.float16)) == {"lokr_w1", "lokr_w2"}  # 4*16 = 64: full is no larger, no rank


def test_lokr_dora_scale_copied():
    r = _g(3)
    dora = torch.rand(12, 1)
    m = LoKrModule.parse("x", {"lokr_w1": r(3, 2), "lokr_w2_a": r(4, 2), "lokr_w2_b": r(2, 5),
                               "dora_scale": dora})
    t = m.directions().tensors([0], torch.float16)
    assert torch.equal(t["dora_scale"], dora)


# ---------------------------------------------------------------------------------------------- LoHa
def _loha(seed, out=12, inp=9, r=4, tucker=False, decay=None, alpha=2.0):
    g = _g(seed)
    w = {}
    for n in ("1", "2"):
        mix = torch.diag(torch.tensor([decay ** i for i in range(r)], dtype=torch.float64)) if decay else torch.eye(r, dtype=torch.float64)
        if tucker:
            w.update({f"hada_w{n}_a": g(r, out), f"hada_w{n}_b": g(r, inp), f"hada_t{n}": g(r, r, 3, 3)})
        else:
            w.update({f"hada_w{n}_a": g(out, r) @ mix, f"hada_w{n}_b": g(r, inp)})
    w["alpha"] = torch.tensor(alpha, dtype=torch.float64)
    return LoHaModule.parse("x", w)


def _truncation_error(m, k) -> float:
    """Dense, float64: ||scale * (P1 o P2 - P1_k o P2_k)||_F, each pair truncated by a dense SVD."""
    def pair(a, b, t, keep):
        p = a @ b if t is None else torch.einsum("ijhw,jq,ip->pqhw", t, b, a).reshape(a.shape[1], -1)
        u, s, vh = torch.linalg.svd(p.double(), full_matrices=False)
        return (u[:, :keep] * s[:keep]) @ vh[:keep]

    def delta(keep):
        return pair(m.w1_a, m.w1_b, m.t1, keep) * pair(m.w2_a, m.w2_b, m.t2, keep) * m.scale
    return float((delta(None) - delta(k)).norm())


@pytest.mark.parametrize("tucker", [False, True])
def test_loha_khatri_rao_errors_equal_dense_truncations(tucker):
    m = _loha(4, tucker=tucker)
    p1 = product_svd(m.w1_a, m.w1_b, m.t1)
    p2 = product_svd(m.w2_a, m.w2_b, m.t2)
    e = hadamard_left_out_sq(p1, p2, m.scale).sqrt()
    assert e.numel() == 5 and float(e[-1]) == 0.0
    for k in range(5):
        assert float(e[k]) == pytest.approx(_truncation_error(m, k), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("tucker", [False, True])
@pytest.mark.parametrize("seed", [5, 6, 7])
def test_loha_reduced_module_and_documented_bound(seed, tucker, tmp_path):
    m = _loha(seed, tucker=tucker)
    d = m.directions()
    full = _dense(m)
    assert d.kind == "loha" and d.old_rank == 4 and d.full_len == 4
    assert bool((torch.from_numpy(d.S)[:-1] >= torch.from_numpy(d.S)[1:]).all())
    assert float(torch.from_numpy(d.S).double().norm()) == pytest.approx(float(full.norm()), rel=1e-5)
    errs = [_truncation_error(m, k) for k in range(5)]
    # documented: sum(S[k:]**2) = ||delta||^2 - H(k), H the least concave majorant of the kept energy
    # G(k) = ||delta||^2 - E(k)^2 (brute force: the best chord over k); so exact where H = G (always
    # when the gains decrease), below the exact error elsewhere
    total = errs[0] ** 2
    kept = [total - e ** 2 for e in errs]
    for k in range(5):
        hull = max(kept[a] + (kept[b] - kept[a]) * (k - a) / (b - a) if b > a else kept[k]
                   for a in range(k + 1) for b in range(k, 5))
        claimed = float(torch.from_numpy(d.S)[k:].double().norm())
        assert claimed ** 2 == pytest.approx(total - hull, rel=1e-5, abs=1e-6 * total)
        assert claimed <= errs[k] * (1 + 1e-6) + 1e-9
    for k in range(1, 5):
        reduced = d.tensors(range(k), torch.float64)
        assert {s: (tuple(t.shape), from_torch(t.dtype)) for s, t in reduced.items()} == d.specs(k, torch.float64)
        got = _dense(_through_file(tmp_path, LoHaModule, reduced))
        assert float((full - got.reshape(full.shape)).norm()) == pytest.approx(errs[k], rel=1e-5, abs=2e-6 * errs[0])
        assert _numel(reduced) <= _numel(m.tensors())


def test_loha_decaying_spectra_exact_at_every_rank():
    # trained pairs have decreasing singular values: the gains decrease, nothing is pooled
    m = _loha(8, out=20, inp=16, r=5, decay=0.3)
    d = m.directions()
    for k in range(6):
        assert float(torch.from_numpy(d.S)[k:].double().norm()) == pytest.approx(_truncation_error(m, k), rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("tucker", [False, True])
def test_loha_full_keep_exact_with_rescale_and_alpha(tucker, tmp_path):
    m = _loha(9, tucker=tucker, alpha=1.0)  # scale 1/4
    d = m.directions()
    t = d.tensors(range(4), torch.float32, rescale=2.0)
    assert float(t["alpha"]) == pytest.approx(1.0) == d.alpha(4)  # scale * rank = 1/4 * 4: the rescale is in the factors
    got = _through_file(tmp_path, LoHaModule, t)
    want = 2.0 * m.delta()
    torch.testing.assert_close(got.delta().reshape(want.shape), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    k2 = d.tensors(range(2), torch.float32)
    assert float(k2["alpha"]) == pytest.approx(0.25 * (4 if tucker else 2))  # Tucker keeps b: the rank stays 4


def test_loha_pair_with_fewer_directions_is_padded():
    # pair 1 has rank 1 only (a rank-1 product stored at rank 3): pair 2 decides the directions
    g = _g(10)
    a = g(8, 1)
    m = LoHaModule.parse("x", {"hada_w1_a": torch.cat([a, a, a], 1), "hada_w1_b": g(3, 7),
                               "hada_w2_a": g(8, 3), "hada_w2_b": g(3, 7)})
    d = m.directions()
    assert torch.from_numpy(d.S).numel() == 3
    t = d.tensors(range(3), torch.float64)
    assert t["hada_w1_a"].shape == (8, 3) and t["hada_w2_a"].shape == (8, 3)
    torch.testing.assert_close(LoHaModule.parse("x", t).delta(), m.delta(), rtol=1e-5, atol=1e-6)


def test_antitonic_by_hand():
    torch.testing.assert_close(antitonic(torch.tensor([3.0, 1.0, 2.0, 0.5])), torch.tensor([3.0, 1.5, 1.5, 0.5]))
    torch.testing.assert_close(antitonic(torch.tensor([1.0, 3.0, 2.0])), torch.tensor([2.0, 2.0, 2.0]))
    torch.testing.assert_close(antitonic(torch.tensor([4.0, 2.0, 1.0])), torch.tensor([4.0, 2.0, 1.0]))
    assert math.isclose(float(antitonic(torch.tensor([0.0, 5.0, -1.0])).sum()), 4.0)


# ---------------------------------------------------------------------- lycoris-lora reads the result
_LY_CASES = {  # name: (type, LyCORIS kwargs, layer, reduced rank)
    "loha linear": ("loha", dict(lora_dim=4, alpha=2), "linear", 2),
    "loha conv": ("loha", dict(lora_dim=4, alpha=2), "conv", 3),
    "loha tucker": ("loha", dict(lora_dim=4, alpha=2, use_tucker=True), "conv", 4),
    "lokr linear": ("lokr", dict(lora_dim=4, alpha=1, factor=4), "linear", 2),
    "lokr both split": ("lokr", dict(lora_dim=2, alpha=1, factor=8, decompose_both=True), "linear", 1),
    "lokr both split, all kept": ("lokr", dict(lora_dim=2, alpha=1, factor=8, decompose_both=True), "linear", 2),
    "lokr conv": ("lokr", dict(lora_dim=2, alpha=3, factor=4), "conv", 1),
    "lokr tucker": ("lokr", dict(lora_dim=2, alpha=3, factor=4, use_tucker=True), "conv", 2),
}


@pytest.mark.parametrize("case", list(_LY_CASES))
def test_reduced_module_loads_in_lycoris_with_the_same_delta(case):
    # the reduced tensors load strictly into lycoris-lora's own module of the new rank (built with the
    # alpha we write, as its loader does) and its forward adds exactly our parser's delta
    import copy

    import torch.nn.functional as F
    from torch import nn

    from lycoris.modules.loha import LohaModule as LyLoha
    from lycoris.modules.lokr import LokrModule as LyLokr

    kind, kwargs, layer_kind, k = _LY_CASES[case]
    cls, ours = (LyLoha, LoHaModule) if kind == "loha" else (LyLokr, LoKrModule)
    torch.manual_seed(0)
    layer = nn.Linear(64, 48) if layer_kind == "linear" else nn.Conv2d(32, 48, 3, padding=1)
    trained = cls("lora_unet_x", copy.deepcopy(layer), 1.0, **kwargs)
    with torch.no_grad():
        for p in trained.parameters():
            p.normal_(0, 0.3)
    state = {s: v.detach().clone() for s, v in trained.state_dict().items() if not s.startswith("org_")}
    m = ours.parse("lora_unet_x", state)
    assert ("both split" in case) == ("lokr_w1_a" in state) and ("tucker" in case) == any("_t" in s for s in state)
    reduced = m.directions().tensors(range(k), torch.float32)
    # a split w1 beside w2 cut to another rank comes out full (LyCORIS keeps one rank for both)
    both = "lokr_w1_a" in reduced
    ly = cls("lora_unet_x", copy.deepcopy(layer), 1.0,
             **{**kwargs, "lora_dim": k, "alpha": float(reduced["alpha"]), "decompose_both": both})
    ly.load_state_dict({s: v for s, v in reduced.items()}, strict=False)
    missing = set(ly.state_dict()) - set(reduced) - {s for s in ly.state_dict() if s.startswith("org_")}
    assert not missing and all(ly.state_dict()[s].shape == t.shape for s, t in reduced.items())
    ly.apply_to()
    delta = ours.parse("lora_unet_x", reduced).delta().reshape(layer.weight.shape)
    x = torch.randn(3, 64) if layer_kind == "linear" else torch.randn(2, 32, 6, 6)
    with torch.no_grad():
        want = layer(x) + (F.linear(x, delta) if layer_kind == "linear" else F.conv2d(x, delta, padding=1))
        got = ly(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if k == torch.from_numpy(m.directions().S).numel():  # everything kept: the trained module's own output
        trained.apply_to()
        with torch.no_grad():
            torch.testing.assert_close(trained(x), want, rtol=1e-4, atol=1e-4)

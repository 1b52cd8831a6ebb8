"""resize-spec Part D: the hand-checked vectors, through our scoring and selection.

Layers are built as ``up = U diag(sqrt s)``, ``down = diag(sqrt s) V^T`` with random orthonormal
U, V and decomposed by the fast path, as the engine does.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from loratools.linalg.lowrank import lowrank_svd
from loratools.ops.resize.recipe import parse_recipe
from loratools.ops.resize.scoring import BaseRefs, layer_scores
from loratools.ops.resize.selection import LayerShape, fit_size, kohya_rank, threshold_rank


def factors(sigma_raw, out, inp, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = len(sigma_raw)
    U, _ = torch.linalg.qr(torch.randn(out, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(inp, r, generator=g, dtype=torch.float64))
    s = torch.tensor(sigma_raw, dtype=torch.float64).sqrt()
    return (U * s).float(), (s[:, None] * V.T).float()


def spectrum(sigma_raw, out, inp, alpha, seed=0):
    up, down = factors(sigma_raw, out, inp, seed)
    r = len(sigma_raw)
    _, S, _ = lowrank_svd(up, down, scale=alpha / r)
    return S.numpy(), LayerShape(old_rank=r, full_len=min(out, inp), scale=alpha / r)


KS = [8, 4, 2, 1, 0.5]


# ---- kohya (B2), compat and corrected -------------------------------------------------
@pytest.mark.parametrize("recipe,compat_k,corrected_k", [
    ("sv_ratio=4,max_rank=8", 3, 3),
    ("sv_ratio=2,max_rank=8", 2, 2),
    ("sv_fro=0.9,max_rank=8", 3, 2),
    ("sv_fro=0.99,max_rank=8", 4, 3),
    ("sv_cumulative=0.9,max_rank=8", 4, 3),
    ("sv_cumulative=0.5,max_rank=8", 2, 1),
])
def test_kohya_vectors_1_to_4(recipe, compat_k, corrected_k):
    S, layer = spectrum(KS, 10, 10, alpha=2.5)  # scale 0.5
    r = parse_recipe(recipe)
    assert kohya_rank(S, layer, r, compat=True) == compat_k
    assert kohya_rank(S, layer, r, compat=False) == corrected_k


def test_kohya_vector_1_alpha_and_retention():
    S, layer = spectrum(KS, 10, 10, alpha=2.5)
    k = kohya_rank(S, layer, parse_recipe("sv_ratio=4,max_rank=8"), compat=True)
    assert layer.scale * k == pytest.approx(1.5)
    s = torch.from_numpy(S).double()
    assert float(s[:k].norm() / s.norm()) == pytest.approx(0.99264, abs=1e-5)
    assert float(s[:k].sum() / s.sum()) == pytest.approx(0.90323, abs=1e-5)


def test_kohya_vector_5_noise_direction_caps_and_zero_layer():
    S, layer = spectrum([8, 4, 2, 1], 64, 32, alpha=1)
    assert kohya_rank(S, layer, parse_recipe("sv_ratio=100,max_rank=8"), compat=True) == 5
    assert kohya_rank(S, layer, parse_recipe("sv_ratio=100,max_rank=4"), compat=True) == 4
    assert kohya_rank(S, layer, parse_recipe("rank=2"), compat=True) == 2
    assert kohya_rank(S, layer, parse_recipe("sv_ratio=100,max_rank=8"), compat=False) == 4  # never above old rank
    assert kohya_rank(S, layer, parse_recipe("rank=8"), compat=False) == 4
    zero = np.zeros(4, dtype=np.float32)
    assert kohya_rank(zero, layer, parse_recipe("sv_fro=0.9"), compat=True) == 1
    assert kohya_rank(zero, layer, parse_recipe("sv_fro=0.9"), compat=False) == 0


def test_kohya_vector_6_alpha_is_float32_rounded():
    alpha_new = float(torch.tensor(1.0 / 5, dtype=torch.float32) * 3)
    assert alpha_new == 0.6000000238418579
    assert float(torch.tensor(1.0 / 5 * 3, dtype=torch.float32)) == alpha_new  # our fp32 alpha agrees


def test_conv_rank_applies_to_kxk_only_unless_compat():
    S, _ = spectrum([8, 4, 2, 1], 64, 32, alpha=4)
    one = LayerShape(old_rank=4, full_len=32, is_4d=True, kxk=False, scale=1.0)
    kxk = LayerShape(old_rank=4, full_len=32, is_4d=True, kxk=True, scale=1.0)
    r = parse_recipe("rank=4,conv_rank=2")
    assert kohya_rank(S, one, r) == 4 and kohya_rank(S, kxk, r) == 2
    assert kohya_rank(S, one, r, compat=True) == 2


# ---- elias (A2.5-A2.7) -------------------------------------------------------------------
C = dict(sigma=[8, 4, 2, 1, 0.5], out=64, inp=32, alpha=5)
CKPT = BaseRefs(fro=1000.0, spn=100.0)


def elias_k(recipe_text, sigma, out, inp, alpha, base=CKPT):
    r = parse_recipe(recipe_text)
    S, layer = spectrum(sigma, out, inp, alpha)
    scores = layer_scores(S, r.weights, rescale=r.rescale, params=out + inp, base=base)
    return threshold_rank(scores, r.param, S, layer, r), scores


@pytest.mark.parametrize("recipe,k", [
    ("fro_ckpt=1,thr=-3.5", 5), ("fro_ckpt=1,thr=-2.5", 2), ("fro_ckpt=1,thr=-3", 4),
    ("spn_ckpt=1,thr=-1.5", 2), ("spn_lora=1,thr=-0.5", 2), ("fro_lora=1,thr=-1", 4),
    ("fro_ckpt=3,spn_lora=1,thr=-1", 0),
])
def test_elias_vector_7(recipe, k):
    got, scores = elias_k(recipe, **C)
    assert got == k
    if recipe == "fro_ckpt=1,thr=-3.5":
        assert scores.tolist() == pytest.approx([-2.097, -2.398, -2.699, -3.0, -3.301], abs=1e-3)


def test_elias_vector_8_layer_d():
    got, _ = elias_k("spn_lora,thr=-0.5", [8, 4, 2, 1], 64, 32, alpha=1)
    assert got == 2


def test_elias_vector_9_params():
    assert elias_k("params=1,thr=-2", **C)[0] == 4
    assert elias_k("params=1,thr=-2", [10, 5, 1], 1024, 1024, alpha=3)[0] == 0


def test_elias_vector_11_rescale_shifts_scores():
    base = BaseRefs(fro=1.0, spn=1.0)
    assert elias_k("fro_ckpt,rescale=0.5,thr=0.3", [10, 5, 1], 1024, 1024, 3, base)[0] == 2
    assert elias_k("fro_ckpt,rescale=0.5,thr=0.3", [8, 3, 0.5], 512, 512, 3, base)[0] == 1


def test_subspace_zero_projection_always_kept():
    S, layer = spectrum([8, 4], 16, 16, alpha=2)
    r = parse_recipe("subspace=1,thr=100")
    scores = layer_scores(S, r.weights, rescale=1.0, params=32,
                          base=BaseRefs(fro=1.0, spn=1.0, subspace=torch.tensor([0.0, 1.0])))
    assert math.isinf(float(scores[0])) and threshold_rank(scores, 100.0, S, layer, r) == 1


def test_unmatched_layer_uses_its_own_references():
    S, layer = spectrum(KS, 64, 32, alpha=5)
    r = parse_recipe("fro_ckpt=1,thr=-3.55")
    scores = layer_scores(S, r.weights, rescale=1.0, params=96, base=None)
    assert scores.tolist() == pytest.approx(np.log10(S / np.linalg.norm(S)).tolist(), abs=1e-6)


# ---- size= (A2.6 vector 10, with our exact "never above the budget" rule) ----------------
def _size_setup():
    SA, la = spectrum([10, 5, 1], 1024, 1024, alpha=3)
    SB, lb = spectrum([8, 3, 0.5], 512, 512, alpha=3)
    r = parse_recipe("fro_ckpt=1,size=1")
    base = BaseRefs(fro=1.0, spn=1.0)
    scores = [layer_scores(S, r.weights, rescale=1.0, params=p, base=base) for S, p in ((SA, 2048), (SB, 1024))]
    cost = [2 * 2048, 2 * 1024]
    return r, scores, [SA, SB], [la, lb], lambda ranks, thr: sum(k * c for k, c in zip(ranks, cost))


@pytest.mark.parametrize("budget,ranks,thr", [
    (10485.76, [2, 1], math.log10(5)),  # elias overshoots to 12288 here; we stay below
    (12288, [2, 2], math.log10(3)),     # exactly the budget: elias' vector, same answer
    (12289, [2, 2], math.log10(3)),     # elias: 16384 bytes
    (10 ** 9, [3, 3], -math.inf),
    (4096, [1, 0], 1.0),                # elias size=0: A k=1, B dropped
])
def test_size_vector_10_never_exceeds(budget, ranks, thr):
    r, scores, spectra, layers, size_of = _size_setup()
    got_thr, got_ranks, size = fit_size(scores, spectra, layers, r, size_of, int(budget))
    assert got_ranks == ranks and size <= budget
    assert got_thr == pytest.approx(thr, abs=1e-6) if math.isfinite(thr) else got_thr == thr


def test_size_below_minimum_raises():
    r, scores, spectra, layers, size_of = _size_setup()
    with pytest.raises(ValueError):
        fit_size(scores, spectra, layers, r, lambda ranks, thr: 100 + size_of(ranks, thr), 50)


# ---- through the engine: written factors, alphas, shapes, sizes (vectors 7, 8, 12) -------
def _write(tmp_path, layers):
    from loratools.io import save_tensors

    t = {}
    for name, (sigma, out, inp, alpha, kernel, seed) in layers.items():
        up, down = factors(sigma, out, inp * kernel * kernel, seed)
        r = len(sigma)
        if kernel > 1:
            up, down = up.reshape(out, r, 1, 1), down.reshape(r, inp, kernel, kernel)
        t.update({f"{name}.lora_up.weight": up.half(), f"{name}.lora_down.weight": down.half(),
                  f"{name}.alpha": torch.tensor(float(alpha)).half()})
    path = tmp_path / "v.safetensors"
    save_tensors(path, t, {"ss_network_dim": "4"})
    return path


def test_vector_8_factors_alpha_and_spectrum(tmp_path):
    from loratools.io import open_safetensors
    from loratools.ops.resize import Resizer

    path = _write(tmp_path, {"lora_unet_d": ([8, 4, 2, 1], 64, 32, 1, 1, 0),
                             "lora_unet_c": ([8, 4, 2, 1, 0.5], 64, 32, 5, 1, 1)})
    res = Resizer(None).resize(path, "spn_lora,thr=-0.5:fro_ckpt=0,spn_lora=3,fro_lora=1,thr=-0.9", output=tmp_path)
    sd = open_safetensors(res.outcomes[0].path)
    assert res.outcomes[0].path.name == "v_spnlora1_th-0.5.safetensors"
    assert sd["lora_unet_d.alpha"].dtype == torch.float32 and float(sd["lora_unet_d.alpha"]) == 0.5
    up, down = sd["lora_unet_d.lora_up.weight"].float(), sd["lora_unet_d.lora_down.weight"].float()
    assert up.norm(dim=0).tolist() == pytest.approx([2.828, 2.0], abs=2e-3)
    assert down.norm(dim=1).tolist() == pytest.approx([2.828, 2.0], abs=2e-3)
    assert (torch.linalg.svdvals(0.25 * up @ down)[:3]).tolist() == pytest.approx([2.0, 1.0, 0.0], abs=2e-3)


def test_vector_7_dropped_layer_writes_no_keys(tmp_path):
    from loratools.io import open_safetensors
    from loratools.ops.resize import Resizer

    path = _write(tmp_path, {"lora_unet_c": ([8, 4, 2, 1, 0.5], 64, 32, 5, 1, 1),
                             "lora_unet_big": ([800, 400], 64, 32, 2, 1, 2)})
    (o,) = Resizer(None).resize(path, "params=1,thr=-0.5", output=tmp_path).outcomes
    assert o.layers_dropped == ["lora_unet_c"]
    assert not any(k.startswith("lora_unet_c.") for k in open_safetensors(o.path))


def test_vector_12_conv_shapes_and_bytes_per_rank(tmp_path):
    from loratools.ops.resize import Resizer

    path = _write(tmp_path, {"lora_unet_e": ([8, 4], 320, 320, 2, 3, 3)})
    rz = Resizer(None)
    one, two = (rz.resize(path, f"rank={k}", dry_run=True).outcomes[0] for k in (1, 2))
    assert two.size_after - one.size_after in range(6400, 6400 + 16)  # + a few header bytes
    (o,) = rz.resize(path, "rank=1", output=tmp_path).outcomes
    from loratools.io import open_safetensors

    sd = open_safetensors(o.path)
    assert sd["lora_unet_e.lora_down.weight"].shape == (1, 320, 3, 3)
    assert sd["lora_unet_e.lora_up.weight"].shape == (320, 1, 1, 1)
    assert o.path.stat().st_size == one.size_after  # the prediction is the written size, to the byte

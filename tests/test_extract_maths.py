"""extract's decompositions and rank choices against a dense SVD (issue 16, item 1).

The exact (Gram) route must give the dense SVD's singular values and directions, and every recipe
must choose the same ranks from it as from the dense spectrum; the randomized route (fixed ranks)
must keep nearly the optimal share of the difference, measured against the dense optimum.
"""

from __future__ import annotations

import math

import pytest
import torch

from loratools.keys.scope import module_scope
from loratools.ops.extract.decompose import gram_svd, gram_triplets, randomized_svd
from loratools.ops.extract.select import choose, layer_shape, scores, use_randomized
from loratools.ops.resize.recipe import parse_recipe
from loratools.ops.resize.scoring import BaseRefs


def spectrum_matrix(out: int, n: int, decay: float, seed: int, rank: int | None = None) -> torch.Tensor:
    """``U diag(s) V^T`` with ``s_i = i^-decay`` (a fine-tune's heavy tail at small decay)."""
    g = torch.Generator().manual_seed(seed)
    m = min(out, n) if rank is None else rank
    s = torch.arange(1, m + 1, dtype=torch.float64) ** -decay
    u, _ = torch.linalg.qr(torch.randn(out, m, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64))
    return ((u * s) @ v.T).float()


@pytest.mark.parametrize(("out", "n"), [(48, 48), (40, 96), (96, 40), (64, 576)])
@pytest.mark.parametrize("chunk", [1 << 22, 100])
def test_gram_route_is_the_dense_svd(out, n, chunk, monkeypatch):
    """Also built from slices of D a few rows or columns wide (a large layer's float64 chunks)."""
    from loratools.ops.extract import decompose

    monkeypatch.setattr(decompose, "CHUNK", chunk)
    D = spectrum_matrix(out, n, 0.7, seed=out + n)
    dense = torch.linalg.svdvals(D.double())
    g = gram_svd(D)
    torch.testing.assert_close(g.spectrum.S, dense, rtol=1e-6, atol=1e-9)
    assert g.spectrum.fro == pytest.approx(float(dense.norm()), rel=1e-6)
    idx = [0, 3, 7]
    U, S, Vh = gram_triplets(D, g, idx)
    torch.testing.assert_close(U.T @ U, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close((U.T @ D.double() @ Vh.T).diagonal(), S, rtol=1e-6, atol=1e-9)


RECIPES = ["sv_fro=0.9", "sv_fro=0.5,max_rank=5", "sv_ratio=4", "sv_cumulative=0.6", "fro_ckpt=1,thr=-1.2",
           "fro_lora=1,thr=-0.8", "spn_lora=1,params=0.2,thr=-1.5", "rank=6,min_rank=2", "sv_ratio=2,min_rank=3"]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize(("decay", "shape"), [(0.3, (64, 64)), (1.0, (48, 144)), (2.0, (80, 40))])
def test_exact_route_chooses_the_dense_ranks(recipe, decay, shape):
    r = parse_recipe(recipe)
    D = spectrum_matrix(*shape, decay, seed=7)
    W = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    dense = torch.linalg.svdvals(D.double()).float()
    ours = gram_svd(D, vectors=False).S
    ly = layer_shape(shape)
    refs = BaseRefs(fro=float(W.norm()), spn=None)
    params = shape[0] + shape[1]
    sc_ours = scores(r, ours, params, refs) if r.uses_scores else None
    sc_dense = scores(r, dense, params, refs) if r.uses_scores else None
    assert choose(r, ours, ly, sc_ours) == choose(r, dense, ly, sc_dense)


@pytest.mark.parametrize("decay", [0.3, 0.5, 1.0])
def test_randomized_fixed_rank_is_near_optimal(decay):
    D = spectrum_matrix(640, 640, decay, seed=11)
    k = 24
    ly = layer_shape((640, 640))
    assert use_randomized(parse_recipe(f"rank={k}"), ly, exact=False)
    assert not use_randomized(parse_recipe(f"rank={k}"), ly, exact=True)
    assert not use_randomized(parse_recipe("sv_fro=0.9"), ly, exact=False)
    U, S, Vh, spec = randomized_svd(D, k)
    dense = torch.linalg.svdvals(D.double())
    optimal = float((dense[:k] ** 2).sum())
    captured = float(torch.linalg.vector_norm(U.T.double() @ D.double() @ Vh.T.double()) ** 2)
    assert captured == pytest.approx(float((S.double() ** 2).sum()), rel=1e-4)  # what the report says is kept
    assert captured / optimal > 0.995
    assert spec.fro == pytest.approx(float(dense.norm()), rel=1e-6)
    again = randomized_svd(D, k)
    assert torch.equal(again[1], S)  # seeded: the same result every run


def test_small_layers_use_the_exact_route():
    assert not use_randomized(parse_recipe("rank=32"), layer_shape((160, 160)), exact=False)
    assert use_randomized(parse_recipe("rank=32,conv_rank=8"), layer_shape((1280, 1280, 3, 3)), exact=False)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_scope_matches_the_trainer_targets(arch, request):
    """keys.scope decides from paths what sd-scripts' networks.lora wraps by class (tiny.target_modules)."""
    from loratools.keys.index import BaseIndex
    from loratools.tiny import target_modules

    pipe = request.getfixturevalue(f"tiny_{arch}")
    tes = [te for te in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if te is not None]
    index = BaseIndex.from_modules(arch, pipe.unet, tes)
    by_class = {"attn": set(), "conv": set()}
    for component, path, _ in target_modules(pipe, "locon"):
        by_class["conv"].add((component, path))
    for component, path, _ in target_modules(pipe, "lora"):
        by_class["attn"].add((component, path))
    by_class["conv"] -= by_class["attn"]
    by_path = {"attn": set(), "conv": set()}
    for target in index.targets():
        info = index.info(target)
        scope = module_scope(info.component, info.path, tuple(target.shape))
        if scope is not None:
            path = info.path if info.component == "unet" else info.path.removeprefix("text_model.")
            by_path[scope].add((info.component, path))
    strip = {(c, p.removeprefix("text_model.")) for c, p in by_class["attn"]}
    assert by_path["attn"] == strip and by_path["conv"] == by_class["conv"]
    assert math.prod((len(by_path["attn"]), len(by_path["conv"]))) > 0

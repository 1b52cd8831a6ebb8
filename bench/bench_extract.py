"""Benchmark ``loratools extract`` against sd-scripts' method, measured in the same run.

sd-scripts' ``extract_lora_from_models.py`` takes ``torch.linalg.svd`` of every difference (full
matrices, all of U and V) and keeps the top ``--dim``. Here, for every distinct layer shape of a real
model (names and shapes from ``tests/fixtures``), one synthetic difference with a heavy-tailed
spectrum (``sigma_i ~ i^-0.5``, as a full fine-tune's) is decomposed three ways:

* ``dense``: the baseline, sd-scripts' dense SVD (``full_matrices=True``), written here;
* ``exact``: loratools' exact route (float64 Gram + eigh, then the kept directions) for the recipe;
* ``fixed``: what ``-r rank=K`` does (the randomized route on large layers, else the exact one).

Per shape it checks that the exact route chooses the dense SVD's ranks for the recipe, and how much
of the optimal energy the fixed-rank route keeps; times are multiplied by how many layers have that
shape, giving a whole-model estimate for each method. ``--full`` also runs a real streaming extract on
a synthetic tuned/base pair of the model's full size in a child process and reports its peak
resident memory above an interpreter with torch imported (the models are never loaded whole).

Usage:
    python bench/bench_extract.py                       # SD1.5 shapes, rank 32, recipe sv_fro=0.9
    python bench/bench_extract.py --model sdxl --rank 64 --recipe fro_ckpt=1,thr=-2
    python bench/bench_extract.py --model sd15 --full   # + streaming run (writes ~4.3 GB to a temp folder)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import FIXTURES, _status_kib, _write_synthetic, json_size  # noqa: E402

MODELS = {"sdxl": "ckpt_sdxl_single_file.json", "sd15": "ckpt_sd15_single_file.json"}


def layer_shapes(model: str) -> Counter:
    """``{(weight shape, label): count}`` of every weight extract compares (scope all)."""
    import torch

    from loratools.io.checkpoint import ModelSource
    from loratools.ops.extract.pairs import pair_models

    data = json.loads((FIXTURES / MODELS[model]).read_text())
    sd = {k: torch.empty(v["shape"], device="meta") for k, v in data["tensors"].items()}
    src = ModelSource(Path(MODELS[model]), "single_file", {"": sd})
    return Counter(p.shape for p in pair_models(src, src, "all").pairs)


def synthetic_difference(shape: tuple[int, ...], seed: int):
    """``U diag(s) V^T`` with ``s_i = 0.05 * i^-0.5``, flattened like a conv kernel."""
    import torch

    out, n = shape[0], math.prod(shape[1:])
    m = min(out, n)
    g = torch.Generator().manual_seed(seed)
    s = 0.05 * torch.arange(1, m + 1, dtype=torch.float32) ** -0.5
    u, _ = torch.linalg.qr(torch.randn(out, m, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, m, generator=g))
    return (u * s) @ v.T, torch.randn(out, n, generator=g) * 0.05


def dense_sd_scripts(D, k: int):
    """The baseline: sd-scripts' full SVD of the difference, then its top ``k``."""
    import torch

    U, S, Vh = torch.linalg.svd(D)
    return U[:, :k] @ torch.diag(S[:k]), Vh[:k], S


def time_shape(shape, args) -> dict:
    import torch

    from loratools.ops.extract.decompose import gram_svd, gram_triplets, randomized_svd
    from loratools.ops.extract.select import choose, fixed_rank, layer_shape, scores, use_randomized
    from loratools.ops.resize.recipe import parse_recipe
    from loratools.ops.resize.scoring import BaseRefs

    D, W = synthetic_difference(shape, seed=sum(shape))
    ly = layer_shape(shape)
    recipe = parse_recipe(args.recipe)
    fixed = parse_recipe(f"rank={args.rank}")
    params = shape[0] + math.prod(shape[1:])
    refs = BaseRefs(fro=float(W.norm()), spn=None)

    t = time.perf_counter()
    _, _, S_dense = dense_sd_scripts(D, min(args.rank, ly.old_rank))
    dense_s = time.perf_counter() - t

    t = time.perf_counter()
    g = gram_svd(D)
    sc = scores(recipe, g.spectrum.S, params, refs) if recipe.uses_scores else None
    idx = choose(recipe, g.spectrum.S, ly, sc)
    gram_triplets(D, g, idx)
    exact_s = time.perf_counter() - t
    sc_dense = scores(recipe, S_dense, params, refs) if recipe.uses_scores else None
    same_ranks = idx == choose(recipe, S_dense, ly, sc_dense)

    k = fixed_rank(fixed, ly)
    t = time.perf_counter()
    if use_randomized(fixed, ly, exact=False):
        _, S_k, _, _ = randomized_svd(D, k)
        route = "randomized"
    else:
        g2 = gram_svd(D)
        _, S_k, _ = gram_triplets(D, g2, list(range(k)))
        route = "exact"
    fixed_s = time.perf_counter() - t
    optimal = float((S_dense[:k].double() ** 2).sum())
    return {"shape": list(shape), "dense_s": dense_s, "exact_s": exact_s, "fixed_s": fixed_s, "fixed_route": route,
            "recipe_rank": len(idx), "same_ranks_as_dense": same_ranks,
            "fixed_energy_vs_optimal": float((S_k.double() ** 2).sum()) / optimal if optimal else 1.0,
            "threads": torch.get_num_threads()}


def _child(tuned: Path, base: Path, out: Path, recipe: str) -> None:
    import torch  # noqa: F401  (the baseline is "an interpreter with torch imported")

    from loratools.ops.extract import ExtractOptions, extract

    baseline = _status_kib("VmRSS")
    anon0 = _status_kib("RssAnon")
    peak_anon = [anon0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak_anon[0] = max(peak_anon[0], _status_kib("RssAnon"))

    threading.Thread(target=sample, daemon=True).start()
    start = time.perf_counter()
    result = extract(ExtractOptions(tuned, base, out, recipe=recipe))
    elapsed = time.perf_counter() - start
    done.set()
    print(json.dumps({"extract_s": elapsed, "peak_rss_above_mib": (_status_kib("VmHWM") - baseline) / 1024,
                      "peak_anon_above_mib": (peak_anon[0] - anon0) / 1024, "layers": len(result.layers),
                      "written": len(result.written), "size_mib": result.file.size / 2**20, "kept": result.kept}))


def full_run(args) -> dict:
    fixture = FIXTURES / MODELS[args.model]
    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        need = 2.2 * json_size(fixture) / 2**30
        free = shutil.disk_usage(work).free / 2**30
        if free < need:
            sys.exit(f"need about {need:.1f} GiB free in {work}, have {free:.1f} GiB")
        base, tuned, out = work / "base.safetensors", work / "tuned.safetensors", work / "lora.safetensors"
        _write_synthetic(fixture, base, 0.02, 0)
        _write_synthetic(fixture, tuned, 0.02, 1)  # another draw: every weight differs
        proc = subprocess.run([sys.executable, __file__, "--child", str(tuned), str(base), str(out),
                               "--recipe", f"rank={args.rank}"], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stderr)
        numbers = json.loads(proc.stdout.strip().splitlines()[-1])
        numbers["model_gib"] = base.stat().st_size / 2**30
        return numbers
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="sd15")
    ap.add_argument("--rank", type=int, default=32, help="the fixed rank (sd-scripts' --dim)")
    ap.add_argument("--recipe", default="sv_fro=0.9", help="a recipe for the exact route")
    ap.add_argument("--full", action="store_true", help="also run a whole streaming extract (peak memory)")
    ap.add_argument("--full-only", action="store_true", help="only the streaming extract")
    ap.add_argument("--child", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(*args.child, args.recipe)
        return
    if args.full_only:
        f = full_run(args)
        print(json.dumps(f | {"load_average": os.getloadavg()}, indent=2))
        return

    shapes = layer_shapes(args.model)
    rows = []
    for shape, count in sorted(shapes.items(), key=lambda kv: -math.prod(kv[0])):
        row = time_shape(shape, args) | {"count": count}
        rows.append(row)
        label = "x".join(map(str, shape))
        print(f"{label:>16} x{count:<3} dense {row['dense_s']:7.3f} s  exact {row['exact_s']:6.3f} s "
              f"({row['recipe_rank']:4d} kept, same as dense: {row['same_ranks_as_dense']})  rank {args.rank} "
              f"{row['fixed_s']:6.3f} s {row['fixed_route']:>10} ({100 * row['fixed_energy_vs_optimal']:.2f} % of "
              "optimal energy)", file=sys.stderr)
    total = {key: sum(r[key] * r["count"] for r in rows) for key in ("dense_s", "exact_s", "fixed_s")}
    summary = {"model": args.model, "layers": sum(shapes.values()), "distinct_shapes": len(shapes),
               "recipe": args.recipe, "rank": args.rank, "estimated_total_s": total,
               "speedup_exact_vs_dense": total["dense_s"] / total["exact_s"],
               "speedup_fixed_vs_dense": total["dense_s"] / total["fixed_s"],
               "all_ranks_equal_dense": all(r["same_ranks_as_dense"] for r in rows),
               "worst_fixed_energy_vs_optimal": min(r["fixed_energy_vs_optimal"] for r in rows),
               "load_average": os.getloadavg(), "cpus": os.cpu_count(), "rows": rows}
    if args.full:
        summary["full_run"] = full_run(args)
    print(json.dumps(summary, indent=2))
    print(f"\n{args.model}: {summary['layers']} layers ({len(shapes)} shapes). Whole-model decomposition time, "
          f"estimated from one layer per shape: sd-scripts' dense SVD {total['dense_s']:.0f} s; {args.recipe} "
          f"(exact route) {total['exact_s']:.0f} s = {summary['speedup_exact_vs_dense']:.1f}x faster, ranks equal to "
          f"the dense SVD's: {summary['all_ranks_equal_dense']}; rank={args.rank} {total['fixed_s']:.0f} s = "
          f"{summary['speedup_fixed_vs_dense']:.1f}x faster, keeping >= "
          f"{100 * summary['worst_fixed_energy_vs_optimal']:.2f} % of the optimal energy. Load average "
          f"{summary['load_average'][0]:.1f} on {summary['cpus']} cores.")
    if args.full:
        f = summary["full_run"]
        print(f"streaming extract of two {f['model_gib']:.2f} GiB models: {f['extract_s']:.0f} s, peak RSS above a "
              f"torch-imported interpreter {f['peak_rss_above_mib']:.0f} MiB (anonymous {f['peak_anon_above_mib']:.0f} "
              f"MiB), output {f['size_mib']:.1f} MiB")


if __name__ == "__main__":
    main()

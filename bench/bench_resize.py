"""Benchmark `loratools resize` against sd-scripts' dense full-SVD method on an SDXL-sized LoCon.

What it builds (nothing is downloaded):

- a LoCon with the exact module names and shapes of ``fixtures/lora_lycoris_sdxl_locon.json``
  (the seed guide's LyCORIS run: linear dim 8, conv dim 256; 1052 modules), random factors with
  a decaying spectrum, written as an fp16 .safetensors file in a work folder;
- an SDXL-shaped base (the keys of ``fixtures/ckpt_sdxl_single_file.json``) whose weights are
  generated on access, one at a time (seeded per key), so RAM stays bounded and no 7 GB file is
  needed.

What it measures:

- our resize with ``sv_fro=0.9`` (no base needed) and ``fro_ckpt=1,thr=-3.55`` (cold norm cache:
  every base weight generated and its exact norms computed; then warm, from the cache), each in a
  fresh child process: wall time and peak RSS above a child that only imports torch;
- sd-scripts' method (``up @ down`` formed, ``torch.linalg.svd(full_matrices=True)``) timed in this
  run on one layer of every distinct shape, and extrapolated per layer (count of that shape) to
  the whole file. The printout says so.

Run: ``python bench/bench_resize.py [--workdir DIR] [--dense-max-shapes N]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
LORA_FIXTURE = "lora_lycoris_sdxl_locon.json"
CKPT_FIXTURE = "ckpt_sdxl_single_file.json"


def _fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---------------------------------------------------------------------------------------------
# inputs

def _modules(tensors: dict) -> dict[str, dict]:
    mods: dict[str, dict] = {}
    for key, info in tensors.items():
        name, _, suffix = key.partition(".")
        mods.setdefault(name, {})[suffix] = info["shape"]
    return {n: m for n, m in mods.items() if "lora_down.weight" in m}


def _layers() -> dict[str, tuple]:
    """``name -> (out, n, rank)`` of the fixture's modules."""
    return {name: (m["lora_up.weight"][0], math.prod(m["lora_down.weight"][1:]), m["lora_down.weight"][0])
            for name, m in sorted(_modules(_fixture(LORA_FIXTURE)["tensors"]).items())}


def write_lora(path: Path) -> tuple[int, dict[str, tuple]]:
    """The SDXL LoCon file; returns its size and ``name -> (out, n, rank)``."""
    import torch

    from loratools.io import TensorSpec, write_safetensors

    fx = _fixture(LORA_FIXTURE)
    mods = _modules(fx["tensors"])
    layers = _layers()
    specs = []
    for name, m in sorted(mods.items()):
        specs += [TensorSpec(f"{name}.lora_down.weight", torch.float16, tuple(m["lora_down.weight"])),
                  TensorSpec(f"{name}.lora_up.weight", torch.float16, tuple(m["lora_up.weight"])),
                  TensorSpec(f"{name}.alpha", torch.float16, ())]
    cache: dict[str, dict] = {}

    def produce(key: str):
        name, _, suffix = key.partition(".")
        if name not in cache:
            cache.clear()
            out, n, r = layers[name]
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            qu, _ = torch.linalg.qr(torch.randn(out, r, generator=g))
            qd, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
            decay = 0.5 + 0.35 * float(torch.rand((), generator=g))
            # effective sigma_0 ~ 5 % of a base layer's Frobenius norm (~sqrt(out) below)
            s = 0.05 * math.sqrt(out) * decay ** torch.arange(r, dtype=torch.float32)
            alpha = r / 2
            raw = (s / (alpha / r)).sqrt()
            shape_down = mods[name]["lora_down.weight"]
            cache[name] = {"lora_up.weight": (qu * raw).reshape(mods[name]["lora_up.weight"]).half(),
                           "lora_down.weight": (raw[:, None] * qd.T).reshape(shape_down).half(),
                           "alpha": torch.tensor(alpha, dtype=torch.float16)}
        return cache[name].pop(suffix)

    written = write_safetensors(path, specs, produce, fx.get("metadata") or {}, overwrite=True)
    return written.size, layers


def lazy_sdxl_base():
    """An SDXL single-file ``ModelSource`` whose tensors are generated when read."""
    from collections.abc import Mapping

    import torch

    from loratools.io import ModelSource

    shapes = {k: tuple(v["shape"]) for k, v in _fixture(CKPT_FIXTURE)["tensors"].items()}

    class Generated(Mapping):
        seconds = 0.0  # time spent making random weights: bench overhead, not resize work

        def __getitem__(self, key):
            t0 = time.perf_counter()
            shape = shapes[key]
            g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            w = (torch.randn(shape, generator=g) / math.sqrt(fan_in)).half()
            Generated.seconds += time.perf_counter() - t0
            return w

        def __iter__(self):
            return iter(shapes)

        def __len__(self):
            return len(shapes)

    class Source(ModelSource):
        def key_shapes(self, component: str = "") -> dict:
            return dict(shapes)

    return Source(Path("sdxl-generated.safetensors"), "single_file", {"": Generated()}, {})


# ---------------------------------------------------------------------------------------------
# children (fresh processes, so peak RSS is the run's own)

def child(args: argparse.Namespace) -> None:
    import torch  # the RSS baseline is an interpreter with torch imported

    if args.threads:
        torch.set_num_threads(args.threads)

    if args.child == "baseline":
        print(json.dumps({"rss_mb": _peak_rss_mb()}))
        return
    from loratools.ops.resize import Resizer

    t0 = time.perf_counter()
    base = lazy_sdxl_base() if args.child == "ckpt" else None
    rz = Resizer(base, cache_dir=None)
    if args.child == "ckpt" and args.norm_cache:
        from loratools.ops.resize.cache import NormCache

        rz.cache = NormCache(Path(args.norm_cache), "generated-sdxl")
    res = rz.resize(args.lora, args.recipe, output=args.out, overwrite=True)
    o = res.outcomes[0]
    gen = type(base.components[""]).seconds if base is not None else 0.0
    print(json.dumps({"seconds": time.perf_counter() - t0 - gen, "generation_s": gen, "rss_mb": _peak_rss_mb(),
                      "summary": o.summary_line(), "size_after": o.size_after}))


def _run_child(kind: str, lora: Path, recipe: str, out: Path, threads: int, norm_cache: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--lora", str(lora), "--recipe", recipe, "--out", str(out),
           "--threads", str(threads)]
    if norm_cache is not None:
        cmd += ["--norm-cache", str(norm_cache)]
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# sd-scripts' dense method

def dense_seconds(out: int, n: int, r: int) -> float:
    """One layer the sd-scripts way: form up @ down, full SVD with square U and Vh."""
    import torch

    g = torch.Generator().manual_seed(out * 7 + n)
    up, down = torch.randn(out, r, generator=g), torch.randn(r, n, generator=g)
    t0 = time.perf_counter()
    U, S, Vh = torch.linalg.svd(up @ down, full_matrices=True)
    k = min(8, S.numel())
    _ = (U[:, :k] * S[:k]) @ Vh[:k]
    return time.perf_counter() - t0


def dense_estimate(layers: dict[str, tuple], max_shapes: int) -> tuple[float, list[tuple]]:
    """Sum over layers of the measured time of their shape; unmeasured shapes (beyond
    ``max_shapes``, smallest first) are scaled from the measured ones by flops (m n min(m, n))."""
    counts = Counter(layers.values())
    shapes = sorted(counts, key=lambda s: s[0] * s[1] * min(s[0], s[1]), reverse=True)
    measured = {s: dense_seconds(*s) for s in shapes[:max_shapes]}
    rate = sum(measured.values()) / sum(s[0] * s[1] * min(s[0], s[1]) for s in measured)
    total = 0.0
    rows = []
    for s in shapes:
        t = measured.get(s, rate * s[0] * s[1] * min(s[0], s[1]))
        total += t * counts[s]
        rows.append((s, counts[s], t, s in measured))
    return total, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--dense-max-shapes", type=int, default=100,
                    help="time the dense method on at most this many distinct shapes (largest first)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads for both methods (0: torch's default); on a shared, loaded machine 1 "
                         "avoids thread contention dominating the small QR/SVD calls")
    ap.add_argument("--norm-cache-dir", type=Path, default=None,
                    help="reuse the norm cache of an earlier run (skips the slow cold run)")
    ap.add_argument("--child", choices=("baseline", "free", "ckpt"), help=argparse.SUPPRESS)
    ap.add_argument("--lora", help=argparse.SUPPRESS)
    ap.add_argument("--recipe", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--norm-cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_resize_"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "out").mkdir(exist_ok=True)
    lora = work / "sdxl_locon_d8_c256.safetensors"
    t0 = time.perf_counter()
    size, layers = write_lora(lora) if not lora.exists() else (lora.stat().st_size, _layers())
    print(f"LoRA: {len(layers)} modules (SDXL LyCORIS LoCon names/shapes, linear dim 8, conv dim 256), "
          f"{size / 2**20:.1f} MiB fp16, ready in {time.perf_counter() - t0:.1f} s; torch threads "
          f"{torch.get_num_threads()}, {os.cpu_count()} CPUs")
    base_rss = _run_child("baseline", lora, "", work, args.threads)["rss_mb"]
    print(f"interpreter with torch imported: peak RSS {base_rss:.0f} MB")

    cache = args.norm_cache_dir or work / "norm-cache"
    runs = [("sv_fro=0.9", "free", None), ("fro_ckpt=1,thr=-3.55 (cold norm cache)", "ckpt", cache),
            ("fro_ckpt=1,thr=-3.55 (warm norm cache)", "ckpt", cache)]
    if args.norm_cache_dir:  # filled by an earlier run: the cold run is skipped
        del runs[1]
    results = []
    for label, kind, cache in runs:
        r = _run_child(kind, lora, label.split(" ")[0], work / "out", args.threads, cache)
        results.append((label, r))
        gen = f" (+{r['generation_s']:.0f} s generating the random base, not counted)" if r.get("generation_s") else ""
        print(f"ours {label}: {r['seconds']:.1f} s{gen}, peak RSS +{r['rss_mb'] - base_rss:.0f} MB above torch "
              f"(target <= LoRA {size / 2**20:.0f} MB + 300 MB)\n    {r['summary']}")

    t0 = time.perf_counter()
    dense_total, rows = dense_estimate(layers, args.dense_max_shapes)
    n_meas = sum(1 for r in rows if r[3])
    print(f"sd-scripts dense full SVD: measured {n_meas} of {len(rows)} distinct shapes in this run "
          f"({time.perf_counter() - t0:.0f} s), extrapolated per layer by shape count: "
          f"{dense_total:.0f} s for all {len(layers)} layers")
    for (out, n, r), count, t, meas in rows[:6]:
        print(f"    {out}x{n} rank {r}: {t:.2f} s x {count}{'' if meas else ' (scaled by flops)'}")
    for label, r in results:
        print(f"speed ratio vs dense, {label}: {dense_total / r['seconds']:.0f}x (target >= 50x)")


if __name__ == "__main__":
    main()

"""Benchmark ``loratools resize`` on full-size SDXL LoHa and LoKr files (issue 12, part 2).

The files are built from the names and shapes of ``tests/fixtures/lora_lycoris_sdxl_loha.json``
and ``..._lokr.json`` (LyCORIS 4.1.3, dim 8 alpha 4, conv_dim 8, factor 8, preset full: 1052
modules each) with random fp16 factors. Each is resized through the CLI in a fresh process, and
the run is set beside two baselines measured in the same run on the same file:

* ``read``: a fresh process that parses the file and reads every tensor (the floor: no resize
  can take less than reading its input);
* ``old``: the decomposition resize did before issue 12 for these types (exact LoRA factors of
  rank r^2 by Khatri-Rao / Kronecker products, then ``lowrank_svd``), timed on ``--old-sample``
  modules spread over the file and scaled to all of them; the old run also wrote a LoRA 3x (LoHa)
  to 23x (LoKr) larger than its input, which this estimate leaves out (the whole old run took
  about 10 minutes per file). The fixture's LoKr has a full ``lokr_w1`` and split ``lokr_w2``.

It prints seconds, sizes in and out, the ratios, the output's module kinds (the own form must be
kept) and the machine load before and after (the box is shared: read ratios, not seconds).

Usage:
    python bench/bench_resize_lycoris.py                         # both files, -r sv_fro=0.9
    python bench/bench_resize_lycoris.py -r fro_lora=1,thr=-1.5 --kinds lokr
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import FIXTURES, _write_synthetic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

_READ = """
import sys, time
t = time.perf_counter()
from loratools.adapters import load_adapter
f = load_adapter(sys.argv[1])
for m in f.modules.values():
    for x in m.tensors().values():
        x.float().sum()
print(time.perf_counter() - t)
"""

_OLD = """
import sys, time, torch
from loratools.adapters import load_adapter
from loratools.linalg.lowrank import lowrank_svd

def khatri_rao_factors(a1, b1, a2, b2):  # (A1 B1) o (A2 B2) = (A1 * A2)(B1 * B2), rank r1 * r2
    up = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)
    return up, (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])

def kron(a, b):
    return (a[:, None, :, None] * b[None, :, None, :]).reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1])

def thin_factors(w):
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    keep = max(1, int((s > s[0] * 1e-7).sum()))
    return u[:, :keep] * s[:keep], vh[:keep]

f = load_adapter(sys.argv[1])
mods = [f.modules[n] for n in sorted(f.modules)]
step = max(1, len(mods) // int(sys.argv[2]))
sample = mods[::step]
t = time.perf_counter()
for m in sample:
    if m.kind == "loha":
        up, down = khatri_rao_factors(m.w1_a.float(), m.w1_b.float(), m.w2_a.float(), m.w2_b.float())
    else:
        u1, d1 = thin_factors(m.w1.float())
        up, down = kron(u1, m.w2_a.float()), kron(d1, m.w2_b.float())
    lowrank_svd(up, down, scale=m.scale)
print((time.perf_counter() - t) * len(mods) / len(sample))
"""


def _python(code: str, *args: str) -> float:
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True,
                         cwd=REPO)
    return float(out.stdout.strip().splitlines()[-1])


def _resize(lora: Path, recipe: str, out: Path) -> tuple[float, Path]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "loratools", "resize", "-r", recipe, str(lora), "-o", str(out)],
                          capture_output=True, text=True, cwd=REPO)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"loratools resize failed on {lora.name}:\n{proc.stderr}")
    (written,) = [p for p in out.iterdir() if p.suffix == ".safetensors"]
    return elapsed, written


def _kinds(path: Path) -> dict[str, int]:
    from loratools.adapters import load_adapter

    kinds: dict[str, int] = {}
    for m in load_adapter(path).modules.values():
        kinds[m.kind] = kinds.get(m.kind, 0) + 1
    return kinds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-r", "--recipe", default="sv_fro=0.9")
    ap.add_argument("--kinds", nargs="+", default=["loha", "lokr"], choices=["loha", "lokr"])
    ap.add_argument("--old-sample", type=int, default=24, help="modules timed for the old path (0: skip it)")
    ap.add_argument("--json", action="store_true", help="print one JSON object per file instead of text")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_lycoris_") as tmp:
        for kind in args.kinds:
            lora = Path(tmp) / f"sdxl_{kind}.safetensors"
            _write_synthetic(FIXTURES / f"lora_lycoris_sdxl_{kind}.json", lora, 0.02, seed=0)
            load_before = os.getloadavg()[0]
            read = _python(_READ, str(lora))
            out = Path(tmp) / f"out_{kind}"
            out.mkdir()
            seconds, written = _resize(lora, args.recipe, out)
            old = _python(_OLD, str(lora), str(args.old_sample)) if args.old_sample else None
            row = {"file": lora.name, "recipe": args.recipe, "resize_s": round(seconds, 2),
                   "read_s": round(read, 2), "resize_over_read": round(seconds / read, 2),
                   "old_s_estimated": None if old is None else round(old, 1),
                   "speedup_vs_old": None if old is None else round(old / seconds, 1),
                   "mib_in": round(lora.stat().st_size / 2**20, 1), "mib_out": round(written.stat().st_size / 2**20, 1),
                   "kinds_out": _kinds(written), "load_before": load_before, "load_after": os.getloadavg()[0],
                   "cpus": os.cpu_count()}
            if args.json:
                print(json.dumps(row))
                continue
            old_text = "" if old is None else f", old path ~{old:.0f} s (x{old / seconds:.0f})"
            print(f"{kind}: resize {seconds:.2f} s ({args.recipe}), read {read:.2f} s (x{seconds / read:.1f})"
                  f"{old_text}; {row['mib_in']} MiB -> {row['mib_out']} MiB, kinds {row['kinds_out']}; "
                  f"load {load_before:.2f} -> {row['load_after']:.2f} on {row['cpus']} CPUs")


if __name__ == "__main__":
    main()

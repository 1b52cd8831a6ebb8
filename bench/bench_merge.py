"""Benchmark ``loratools merge``: peak memory and wall time of a LoCon merged into a full-size checkpoint.

A synthetic checkpoint with the real key names, shapes and dtypes of SDXL base (fp16, ~6.9 GB; from
``tests/fixtures``) is written once into a temporary folder through ``loratools.io``'s
streaming writer, with an SDXL LoCon (the seed guide's LyCORIS args: 1052 modules, conv_dim 256).
The merge then runs in a child process that imports torch first and records its resident memory;
the result is the peak above that (VmHWM, which also counts mapped file pages, and the peak of
anonymous memory alone, sampled) and the merge's wall time against a plain copy of the same file
(read + write + fsync, as the merge's writer does), measured in the same run.

Usage:
    python bench/bench_merge.py                     # SDXL, generate, measure, delete everything
    python bench/bench_merge.py --model sd15        # quick run: SD1.5 shapes (~2.1 GB)
    python bench/bench_merge.py --workdir /tmp/b --keep   # keep the generated files for another run
    python bench/bench_merge.py --sha256            # with the output's sha256 taken while writing (merge --json)
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
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
MODELS = {"sdxl": ("ckpt_sdxl_single_file.json", "lora_lycoris_sdxl_locon.json"),
          "sd15": ("ckpt_sd15_single_file.json", "lora_kohya_sd15_locon.json")}
_POOL = 1 << 24  # random values reused cyclically: generation costs a memcpy, not an RNG per element


def _dtype(name: str):
    from loratools.io.dtypes import to_torch

    return to_torch(name)


def _write_synthetic(fixture: Path, path: Path, std: float, seed: int) -> None:
    """Write every tensor of a fixture's layout with small random values (integers: zeros)."""
    import torch

    from loratools.io import TensorSpec, write_safetensors

    layout = json.loads(fixture.read_text())["tensors"]
    gen = torch.Generator().manual_seed(seed)
    pool = (torch.randn(_POOL, generator=gen) * std).to(torch.float16)
    offset = [0]

    def produce(name: str):
        info = layout[name]
        dtype, shape = _dtype(info["dtype"]), tuple(info["shape"])
        n = math.prod(shape)
        if not dtype.is_floating_point:
            return torch.zeros(shape, dtype=dtype)
        if name.endswith(".alpha"):
            return torch.tensor(4.0, dtype=dtype).reshape(shape)
        start = offset[0] % _POOL
        offset[0] += 7919
        reps = -(-(start + n) // _POOL)
        flat = pool.repeat(reps)[start:start + n] if reps > 1 else pool[start:start + n]
        return flat.to(dtype).reshape(shape).clone()

    specs = [TensorSpec(k, _dtype(v["dtype"]), tuple(v["shape"])) for k, v in layout.items()]
    metadata = json.loads(fixture.read_text()).get("metadata")
    write_safetensors(path, specs, produce, metadata)


def _plain_copy(src: Path, dst: Path) -> float:
    start = time.perf_counter()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 16 << 20)
        fout.flush()
        os.fsync(fout.fileno())
    elapsed = time.perf_counter() - start
    dst.unlink()
    return elapsed


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _child(base: Path, lora: Path, out: Path, sha256: bool) -> None:
    """Run in a fresh interpreter: torch imported first, then the merge; print JSON numbers."""
    import torch  # noqa: F401  (the baseline is "an interpreter with torch imported")

    from loratools.ops.merge import MergeOptions, WeightedPath, merge_checkpoint

    baseline = _status_kib("VmRSS")
    peak_anon = [_status_kib("RssAnon")]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak_anon[0] = max(peak_anon[0], _status_kib("RssAnon"))

    threading.Thread(target=sample, daemon=True).start()
    anon0 = _status_kib("RssAnon")
    cpu0 = time.process_time()
    start = time.perf_counter()
    result = merge_checkpoint(MergeOptions(base, [WeightedPath(lora, 0.8)], out, sha256=sha256))
    autov2 = result.files[0].autov2 if sha256 else None  # what `merge --json` reports; timed with the merge
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    done.set()
    print(json.dumps({"merge_s": elapsed, "merge_cpu_s": cpu, "baseline_rss_mib": baseline / 1024,
                      "peak_rss_above_mib": (_status_kib("VmHWM") - baseline) / 1024,
                      "peak_anon_above_mib": (peak_anon[0] - anon0) / 1024,
                      "patched": result.patched_keys, "output_autov2": autov2, "copied": result.copied_keys,
                      "applied": result.adapters[0].applied, "modules": result.adapters[0].modules}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="sdxl")
    ap.add_argument("--workdir", type=Path, help="where the synthetic files go (default: a new temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and LoRA")
    ap.add_argument("--sha256", action="store_true", help="also hash the output while writing (as merge --json)")
    ap.add_argument("--child", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(*args.child, args.sha256)
        return

    ckpt_fixture, lora_fixture = MODELS[args.model]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_merge_"))
    work.mkdir(parents=True, exist_ok=True)
    base, lora, out = work / f"{args.model}.safetensors", work / f"{args.model}-locon.safetensors", work / "merged.safetensors"
    try:
        free = shutil.disk_usage(work).free / 2**30
        need = 3 * json_size(FIXTURES / ckpt_fixture) / 2**30
        if free < need:
            sys.exit(f"need about {need:.1f} GiB free in {work}, have {free:.1f} GiB")
        if not base.exists():
            t = time.perf_counter()
            _write_synthetic(FIXTURES / ckpt_fixture, base, 0.02, 0)
            print(f"generated {base.name} ({base.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t:.0f} s",
                  file=sys.stderr)
        if not lora.exists():
            _write_synthetic(FIXTURES / lora_fixture, lora, 0.01, 1)
        copy_before = _plain_copy(base, work / "copy.bin")
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", str(base), str(lora), str(out),
                               *(["--sha256"] if args.sha256 else [])],
                              capture_output=True, text=True)
        process_s = time.perf_counter() - t
        if proc.returncode:
            sys.exit(proc.stderr)
        out.unlink()
        copy_after = _plain_copy(base, work / "copy.bin")
        numbers = json.loads(proc.stdout.strip().splitlines()[-1])
        copy_s = (copy_before + copy_after) / 2
        numbers |= {"load_average": os.getloadavg(), "cpus": os.cpu_count(), "model": args.model, "file_gib": base.stat().st_size / 2**30, "copy_s": copy_s,
                    "copy_runs_s": [copy_before, copy_after], "merge_process_s": process_s,
                    "ratio_to_copy": numbers["merge_s"] / copy_s, "process_ratio_to_copy": process_s / copy_s}
        print(json.dumps(numbers, indent=2))
        print(f"\n{args.model}: {numbers['file_gib']:.2f} GiB, LoCon {numbers['applied']}/{numbers['modules']} modules; "
              f"peak RSS above torch-imported interpreter {numbers['peak_rss_above_mib']:.0f} MiB "
              f"(anonymous {numbers['peak_anon_above_mib']:.0f} MiB); merge {numbers['merge_s']:.1f} s vs copy "
              f"{copy_s:.1f} s = {numbers['ratio_to_copy']:.2f}x (whole process {numbers['process_ratio_to_copy']:.2f}x; "
              f"merge CPU {numbers['merge_cpu_s']:.0f} s; load average {numbers['load_average'][0]:.1f} on "
              f"{numbers['cpus']} cores)")
    finally:
        out.unlink(missing_ok=True)
        (work / "copy.bin").unlink(missing_ok=True)
        if not args.keep:
            for p in (base, lora):
                p.unlink(missing_ok=True)
            if not args.workdir:
                shutil.rmtree(work, ignore_errors=True)


def json_size(fixture: Path) -> int:
    """Bytes of the tensors a fixture layout describes."""
    from loratools.io.dtypes import item_size

    layout = json.loads(fixture.read_text())["tensors"]
    return sum(math.prod(v["shape"]) * item_size(v["dtype"]) for v in layout.values())


if __name__ == "__main__":
    main()

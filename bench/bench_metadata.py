"""Benchmark: `loratools metadata show` reads the header, not the weights.

Builds multi-GB safetensors files cheaply in a temporary folder: the real header of an SDXL
checkpoint (2515 tensors, 6.9 GB of F16) and of a LyCORIS SDXL LoCon, from the shared fixtures,
followed by a sparse data section (valid safetensors: all weights zero, no disk blocks used). Then
times `loratools metadata show --json` (a fresh process, as a user runs it) against reading the
whole file (`cat > /dev/null`, and sha256 with --sha256), and prints the ratio and the bytes each
read. Reading a sparse file costs no disk I/O, so the ratio here is a lower bound of what a real
disk shows.

Usage: python bench/bench_metadata.py [--sha256] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loratools.io.header import data_layout, encode_header

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
CASES = (("ckpt_sdxl_single_file.json", "sdxl_checkpoint.safetensors"),
         ("lora_lycoris_sdxl_locon.json", "sdxl_lycoris_locon.safetensors"))


def make_sparse(fixture: Path, out: Path) -> int:
    """Write the fixture's exact header and a sparse data section; returns the file size."""
    fx = json.loads(fixture.read_text())
    layout = data_layout((k, v["dtype"], tuple(v["shape"])) for k, v in fx["tensors"].items())
    pos = layout[-1][4] if layout else 0
    header = encode_header(layout, fx.get("metadata") or None)
    with open(out, "wb") as fh:
        fh.write(header)
        fh.truncate(len(header) + pos)
    return len(header) + pos


def timed(cmd: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return time.perf_counter() - t, r.stdout


def bytes_read_by_show(path: Path) -> int:
    """rchar of a process around `summarize` (modules imported first, so only file reads count)."""
    code = ("import sys, loratools.adapters, loratools.keys.arch\n"
            "from loratools.ops.metadata import summarize\n"
            "io = lambda: int(open('/proc/self/io').read().split('rchar: ')[1].split()[0])\n"
            "b = io(); summarize(sys.argv[1]); print(io() - b)\n")
    return int(subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                              check=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sha256", action="store_true", help="also time a full sha256 of each file")
    ap.add_argument("--keep", type=Path, help="build the files here and keep them")
    args = ap.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="loratools-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"{'file':34} {'size':>9} {'show':>7} {'cat':>7} {'ratio':>7} {'show read':>12}"
          + (f" {'sha256':>8}" if args.sha256 else ""))
    try:
        for fixture, name in CASES:
            path = folder / name
            size = make_sparse(FIXTURES / fixture, path)
            show_s, out = timed([sys.executable, "-m", "loratools", "metadata", "show", "--json", str(path)])
            doc = json.loads(out)
            cat_s, _ = timed(["sh", "-c", f"cat '{path}' > /dev/null"])
            line = (f"{name:34} {size / 2**30:7.2f}GB {show_s:6.2f}s {cat_s:6.2f}s {cat_s / show_s:6.1f}x "
                    f"{bytes_read_by_show(path):>10,}B")
            if args.sha256:
                from loratools.io.hashes import file_sha256

                t = time.perf_counter()
                file_sha256(path)
                line += f" {time.perf_counter() - t:7.2f}s"
            print(line + f"   ({doc['architecture']['label']}, {doc['tensor_count']} tensors, "
                         f"header {doc['header_size']:,}B)")
    finally:
        if args.keep is None:
            for p in folder.iterdir():
                p.unlink()
            folder.rmdir()
    print("show = `loratools metadata show --json` in a new process (interpreter start included); "
          "cat = reading every byte once; 'show read' = bytes the summary itself read.")


if __name__ == "__main__":
    main()
